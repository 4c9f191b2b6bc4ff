"""core/errors.py: messages stay on one line and carry no terminal control, whatever a file names."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from adapterkit.cli.main import cli
from adapterkit.core.errors import TensorFileError, printable

from helpers import llama_targets, replace_tensors, write_adapter


def test_printable_escapes_control_characters_and_keeps_the_rest():
    assert printable("a\nb\rc\td\x1b[31me\x7f") == "a\\nb\\rc\\td\\x1b[31me\\x7f"
    assert printable("q_proj.lora.A — ü") == "q_proj.lora.A — ü"


def test_every_field_of_a_message_is_escaped():
    error = TensorFileError("bad tensor", file="dir\n/f", location="k\x1b]0;owned\x07", found="x\ny", hint="fix\rit")
    text = str(error)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\x07" not in text
    assert "k\\x1b]0;owned\\x07" in text and "x\\ny" in text
    assert error.to_dict()["location"] == "k\x1b]0;owned\x07"  # the JSON form keeps the exact value


def test_a_tensor_key_with_a_newline_gives_one_error_line(tmp_path):
    folder = write_adapter(tmp_path, targets=llama_targets(layers=[0]))
    replace_tensors(folder, {"evil\nkey\x1b[2J.lora.A": np.zeros((2, 2), np.float32)})
    result = CliRunner().invoke(cli, ["validate", str(folder)])
    assert result.exit_code == 1
    assert "\x1b" not in result.output
    error_lines = [line for line in result.output.splitlines() if "evil" in line]
    assert error_lines and all("key" in line for line in error_lines), result.output
