import sys

try:                         # an interrupt while the heavy imports run: quiet, as in main()
    from .cli import entry
except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":     # not when a spawned process (multiprocessing) imports this as __mp_main__
    entry()
