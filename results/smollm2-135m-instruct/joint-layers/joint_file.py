"""Writes a joint learned vector set (layer -> vector, from joint.py) as lm-eval-steer entries, one per layer,
all routed to the instruction: the first layer's entry carries the instruction's name, the others '<name>@L<layer>'."""
import sys
from safetensors.torch import load_file
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, save_vector_file

src, instruction, multiplier, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
vectors = load_file(src)
entries = []
for i, layer in enumerate(sorted(vectors, key=int)):
    v = vectors[layer]
    name = instruction if i == 0 else f"{instruction}@L{layer}"
    entries.append(SteeringEntry(name, v / v.norm(), int(layer), "add", float(v.norm()) * multiplier, "all", AppliesTo(instruction)))
save_vector_file(out, entries, model="HuggingFaceTB/SmolLM2-135M-Instruct", hidden_size=576, num_layers=30,
                 extra_metadata={"note": f"joint learned set from {src} at x{multiplier} (session 16 experiment)"})
print(out, [(e.name, e.layer, round(e.strength, 2)) for e in entries])
