"""`python -m stages ...` is `pipeline ...`; torchrun launches training this way:
`torchrun --nproc-per-node N -m stages train <options>`."""

from stages.cli import main

main(prog_name="pipeline")
