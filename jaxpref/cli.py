"""`jaxpref COMMAND [ARGS]` (the console script) and `python -m jaxpref COMMAND [ARGS]`.

Each command is a module with `main(argv, prog)`; adding one is a row of `COMMANDS`.
"""
from __future__ import annotations

import difflib
import importlib
import sys

# name -> (module, one line of help, whether it runs models: torch hidden, allocator tuned first)
COMMANDS = {
    "train": ("jaxpref.train", "post-train every model of a config (DPO, IPO, KTO, ORPO, SimPO, CPO)", True),
    "evaluate": ("jaxpref.evaluate", "per-example log-probs and rewards on a split, and their summary", True),
    "export": ("jaxpref.export", "a finished run as a PEFT adapter and/or a merged model; upload to the Hub", True),
    "generate": ("jaxpref.generate", "completions of a config's model, with a run's adapter and/or the base", True),
    "plot": ("jaxpref.plot", "a run's metrics.png (loss, reward accuracy, margins)", False),
    "report": ("jaxpref.report", "report.md/.html comparing every model trained into an output folder", False),
}


def usage(prog: str) -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_, _) in COMMANDS.items())
    return (f"usage: {prog} COMMAND [ARGS]\n\nPreference post-training with LoRA in JAX.\n\ncommands:\n{rows}\n\n"
            f"`{prog} COMMAND --help` describes a command.")


def main(argv: list[str] | None = None, prog: str = "jaxpref") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        print(f"{prog}: error: unknown command `{name}`{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, runs_models = COMMANDS[name]
    if runs_models:
        from jaxpref.runtime.host_memory import tune_malloc
        from jaxpref.runtime.no_torch import hide_torch

        hide_torch()  # jaxpref never uses torch; transformers would import it (~490 MB)
        tune_malloc()  # before any XLA computation (opt-in: JAXPREF_MALLOC_TUNING=1)
    return importlib.import_module(module).main(rest, prog=f"{prog} {name}")


def console() -> None:
    """The `jaxpref` console script."""
    sys.exit(main())
