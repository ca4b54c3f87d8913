"""PyTorch references for read_jax: transcriptions and tiny random-weight builders.

Used by the parity tests (`tests/`) and the benchmarks (`benchmarks/`): each module builds the torch side of
a comparison with read_jax, the same weights going to read_jax through its converter tables.

  torchref.common   torch <-> numpy conversions (`state_dict_numpy`, `to_np`)
  torchref.sam      Meta's `segment_anything` without torchvision, tiny randomised Meta SAMs, (Meta, read_jax)
                    pairs
  torchref.llama    HF `LlamaForCausalLM` pairs with tiny configs
  torchref.clip     HF `CLIPVisionModel` with tiny configs and perturbed weights, (HF, read_jax) pairs
  torchref.llava    LLaVA's multimodal merge, the CLIP + projector + LLaMA reference modules, (torch,
                    read_jax) pairs
  torchref.sasp     READ's SasP functions (similarity map -> points, DtoC), loops and all
  torchref.losses   READ's CE + BCE + Dice formulas
  torchref.read     a torch READ (`TorchRead`), its losses, (torch, read_jax) pairs, for end-to-end parity
  torchref.read_batch  the tiny READ config and batch of that comparison (no torch)

These modules import torch (and transformers / segment_anything), which only the `[test]` and `[convert]`
extras install: `sasp` and `read` on import (`read_batch` never), the others when a builder is called, so
that test modules can import them without torch and skip (tests/helpers.py: skipped locally, a failure when
CI is set). Nothing here is pytest-specific, and read_jax never imports this package.
"""
