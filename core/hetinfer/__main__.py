import sys

try:                         # an interrupt while the heavy imports run: quiet, as in main()
    from .cli import entry
except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

entry()
