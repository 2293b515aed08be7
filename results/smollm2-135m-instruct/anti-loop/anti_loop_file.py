"""The anti-looping entry routed to chosen instructions only (study record, not product code).

``anti-looping.safetensors`` holds one entry for every document; this writes one copy per
instruction, named ``<instruction>:anti-looping`` and routed to it, to merge (``--stack``) over a
file whose own entries for those instructions it should join. SOURCE (default: this folder's
``anti-looping.safetensors``) is another model's single-entry anti-looping file.

    python anti_loop_file.py detectable_format:title,change_case:english_lowercase OUT.safetensors [SOURCE]
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from lm_eval_steer.runtime.vectorfile import AppliesTo, load_vector_file, save_vector_file

HERE = Path(__file__).resolve().parent


def main() -> None:
    instructions, out = sys.argv[1].split(","), sys.argv[2]
    source = load_vector_file(sys.argv[3] if len(sys.argv) > 3 else HERE / "anti-looping.safetensors")
    (entry,) = source.entries
    copies = [replace(entry, name=f"{instruction}:anti-looping", applies_to=AppliesTo(instruction)) for instruction in instructions]
    save_vector_file(out, copies, model=source.model, hidden_size=source.hidden_size, num_layers=source.num_layers, extra_metadata=source.extra_metadata)
    print(f"wrote {out}: {', '.join(copy.name for copy in copies)}")


if __name__ == "__main__":
    main()
