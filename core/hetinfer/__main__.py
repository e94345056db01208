import sys

try:                         # an interrupt while the heavy imports run: quiet, as in main()
    from .cli import main
except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
