"""Count the examples that pass through a teacher, independently of the engine's own counter.

The count comes from a forward hook on the teacher's first layer with parameters, so it also
sees a forward pass that bypasses ``TeacherBank`` or the module's ``__call__``.

Run as a program, it executes one ``synthgen`` command with the hook installed and writes the
count to a JSON file, so tests can sum counts over several processes:

    python -m tests.forward_counter COUNT_FILE transcribe --config run.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


class ForwardCounter:
    """Running total of examples seen by hooked teachers."""

    def __init__(self) -> None:
        self.examples = 0
        self.teachers = 0

    def attach(self, module: torch.nn.Module) -> None:
        """Hook the first layer of `module` that owns parameters."""
        first = next(m for m in module.modules() if next(m.parameters(recurse=False), None) is not None)
        first.register_forward_hook(self._count)
        self.teachers += 1

    def _count(self, module, inputs, output) -> None:
        self.examples += int(inputs[0].shape[0])


def install(counter: ForwardCounter, setattr_function=setattr) -> None:
    """Make the engine's teacher loader attach `counter` to every teacher it loads.

    `setattr_function` lets a test pass ``monkeypatch.setattr`` so the patch is undone.
    """
    import synthgen.transcribe as engine

    original = engine.load_teacher

    def load_and_count(*args, **kwargs):
        teacher = original(*args, **kwargs)
        counter.attach(teacher.module)
        return teacher

    setattr_function(engine, "load_teacher", load_and_count)


def main(argv: list[str]) -> int:
    from synthgen.cli import main as cli_main

    count_file, command = Path(argv[0]), argv[1:]
    counter = ForwardCounter()
    install(counter)
    status = cli_main(command)
    count_file.write_text(json.dumps({"teacher_forward_examples": counter.examples, "exit_status": status}))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
