"""Command line: `python -m keras_adascale demo`."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="keras-adascale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a short real training run: AdaScale vs SGD on digits")
    demo.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from keras_adascale import demo as demo_module

        demo_module.main(verbose=0 if args.quiet else 2)


if __name__ == "__main__":
    main()
