from jdcl_ray.bench import main
from jdcl_ray.errors import run_cli

run_cli(main)
