"""`python -m harness up|demo` (what `./pt up` and `./pt demo` run): the whole system on this machine."""

from harness.cli import app

if __name__ == "__main__":
    app(prog_name="./pt")
