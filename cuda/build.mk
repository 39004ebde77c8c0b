# Native FIITED ops. Filled in by the kernels work; `ext` must stay safe to run on any machine.
.PHONY: ext nvcc-check
ext: venv
nvcc-check:
