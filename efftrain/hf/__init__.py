"""Hugging Face interchange: efftrain runs <-> transformers checkpoints (docs/HF.md).

  efftrain export-hf RUN_DIR --out DIR     a series (or saved quantized) checkpoint -> safetensors + config.json
                                           + generation_config.json + a fast tokenizer, loadable by
                                           AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR) with no
                                           custom code: LlamaForCausalLM (MHA/GQA) or DeepseekV3ForCausalLM
                                           (MLA and/or DeepSeekMoE)
  efftrain import-hf DIR --out RUN_DIR     a local Llama / DeepseekV3 snapshot -> a run directory with one series
                                           checkpoint (eval, ptq, info and grid branches work on it)
  efftrain eval RUN_DIR --text FILE        loss / perplexity / bits per byte on a user's text file

Modules: `mapping` (config translation both ways, what is refused, the weight-name table and the RoPE
row permutation: numpy only), `files` (safetensors and JSON in and out, the atomic output directory),
`export`, `importer`, `text_eval`. Nothing here imports torch or transformers, and nothing is downloaded.
"""

from __future__ import annotations

from efftrain.config import ConfigError


class HFError(ConfigError):
    """An export or import that cannot be done as asked: a missing or unreadable file, an architecture or
    option the other side cannot represent (the message names the field and the nearest supported option),
    tensors that do not fit the config. One line; the CLI prints it as `error: ...` and exits 2."""
