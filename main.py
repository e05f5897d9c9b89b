"""distill-lab command line: the same program as `python -m distillation_lab.main`."""
from distillation_lab.main import main

if __name__ == "__main__":
    raise SystemExit(main())
