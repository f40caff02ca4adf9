"""Shared command-line plumbing of the `ray_jobs` entry points: --config/--set parsing, exit codes,
and the last stdout line (one JSON object) that automation reads."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable

from qlora import console
from qlora.errors import Interrupted, TrainingFailure, UserError, stop_signal

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def config_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML job config, e.g. configs/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted path, e.g. --set lora.r=32 (repeatable)")
    _verbose_flag(p)
    return p


def adapter_parser(description: str) -> argparse.ArgumentParser:
    """Jobs on a saved adapter: the config defaults to the one the adapter was trained with."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, metavar="REF",
                   help="a checkpoint folder from ray_jobs.train, runs:/RUN_ID/adapter_model or models:/NAME/VERSION")
    p.add_argument("--config", help="job config to use instead of the adapter's own (e.g. other eval data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tracking.uri=http://127.0.0.1:5000 (repeatable)")
    _verbose_flag(p)
    return p


class _Verbose(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[console.VERBOSE_ENV] = "1"


def _verbose_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", nargs=0, action=_Verbose, help="also show the libraries' own output (Ray Train's "
                   "INFO lines, progress bars, notices)")


def run(job: Callable[[], dict]) -> int:
    """Run `job`, print its result as the last stdout line, map errors to exit codes."""
    console.quiet_libraries()
    try:
        result = job()
    except UserError as e:
        return _fail(EXIT_BAD_INPUT, str(e), type(e).__name__)
    except TrainingFailure as e:
        return _fail(EXIT_FAILED, str(e), type(e).__name__)
    except Interrupted as e:
        return _fail(EXIT_INTERRUPTED, str(e), type(e).__name__)
    except (KeyboardInterrupt, SystemExit) as e:
        if not stop_signal(e):
            raise
        return _fail(EXIT_INTERRUPTED, "stopped (Ctrl+C or SIGTERM)", "Interrupted")
    except Exception as e:  # what no check foresaw (Ray losing a node, a library's bug): still an error line and JSON
        traceback.print_exc()
        return _fail(EXIT_FAILED, f"unexpected {type(e).__name__}: {e}", type(e).__name__)
    sys.stderr.flush()
    print(json.dumps(result, default=str), flush=True)
    return EXIT_OK


def _fail(code: int, message: str, kind: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    print(json.dumps({"error": message, "error_type": kind, "exit_code": code}), flush=True)
    return code
