"""The `fastgrad` command."""
import argparse

from . import __version__


def build_parser():
    parser = argparse.ArgumentParser(prog='fastgrad', description='fastgrad: a small, fast autodiff engine.')
    parser.add_argument('--version', action='version', version=f'fastgrad {__version__}')
    parser.add_subparsers(dest='command', title='commands')
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    return 0
