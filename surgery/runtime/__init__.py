"""The model runtime every calibration-based feature uses: transformers' causal LM for a checkpoint, built on the
meta device and run one decoder layer at a time, with weight overrides and input hooks, seeded sampling, next-token
log-probabilities and their KL / top-1 agreement, and the KV-cache keyword shim.

========================  ==========================================================================================
``model``                 :func:`build_model` (parameters on meta, buffers real), :func:`decoder_of`,
                          :func:`loaded_model` (everything loaded), :func:`opened`, :func:`one_torch_thread`,
                          :func:`check_device`
``weights``               :class:`Loader` (one module in, one out), :func:`load_parameters`, :func:`set_parameter`,
                          :func:`parameter_aliases`, :func:`overridden_weights`
``stream``                :func:`streamed_model` (transformers' forward, pieces loaded by hooks),
                          :class:`LayerStream` (layers run by hand on captured inputs), :func:`input_hooks`
``text``                  :func:`load_tokenizer`, :func:`calibration_blocks`, :func:`equal_length_batches`
``sampling``              :func:`seeded`, :func:`sample`, :func:`sampled_ids`, :func:`self_generated_ids`,
                          :func:`self_generated_text`, :func:`sample_next`, :func:`tensor_seed`
``scoring``               :func:`log_probs`, :func:`kl_per_position`, :func:`mean_kl`, :func:`top1_agreement`,
                          :func:`agreement`, :func:`compare_logits`, :func:`captured_inputs`
``cache``                 :func:`cache_kwargs`, :func:`output_cache`
========================  ==========================================================================================

Used by AIM (:mod:`surgery.merge.aim`), selfcal (:mod:`surgery.quantize.selfcal`), verify
(:mod:`surgery.quantize.verify`) and the prompt adapters (:mod:`surgery.adapters`). A new calibration-based method
gets streaming for free: memory is one decoder layer (plus the embedding) whatever the model's size. Per-channel
input statistics in one pass (as AIM, or AWQ's activation scales)::

    import torch
    from surgery.runtime import calibration_blocks, equal_length_batches, input_hooks, load_tokenizer, opened, \\
        self_generated_text, streamed_model

    with opened("org/model") as checkpoint:
        text = self_generated_text(checkpoint, max_tokens=2048, seed=0)          # or any calibration text
        blocks = calibration_blocks(load_tokenizer(checkpoint), text, max_tokens=2048)
        sums = {}                                                                # module → Σ |x| per channel

        def record(name):
            def add(x):
                sums[name] = sums.get(name, 0) + x.abs().reshape(-1, x.shape[-1]).sum(0)
            return add

        with streamed_model(checkpoint) as model:
            down = [name for name, _ in model.named_modules() if name.endswith("mlp.down_proj")]
            with input_hooks(model, {name: record(name) for name in down}), torch.no_grad():
                for batch in equal_length_batches(blocks, batch_tokens=8192):
                    model.get_decoder()(input_ids=batch, use_cache=False)

Sequential calibration (each layer calibrated on the outputs of the already-changed layers before it, as GPTQ)::

    stream = LayerStream(checkpoint, chunk=8)
    hidden, kwargs = stream.layer_inputs(ids)
    for index, layer in stream.each_layer():
        with input_hooks(stream.model, {name: observe(name) for name in stream.linears(index)}):
            for c, h in enumerate(hidden):
                stream.run(index, h, kwargs[c])
        new = {name: calibrated(name) for name in stream.linears(index)}
        with overridden_weights(stream.linears(index), new):
            hidden = [stream.run(index, h, kwargs[c]) for c, h in enumerate(hidden)]
"""

from surgery.runtime.cache import cache_kwargs, output_cache
from surgery.runtime.model import build_model, check_device, decoder_of, loaded_model, one_torch_thread, opened
from surgery.runtime.sampling import (
    sample, sample_next, sampled_ids, seeded, self_generated_ids, self_generated_text, start_and_pad, tensor_seed,
)
from surgery.runtime.scoring import (
    agreement, captured_inputs, compare_logits, kl_per_position, log_probs, mean_kl, top1_agreement,
)
from surgery.runtime.stream import LayerStream, input_hooks, streamed_model
from surgery.runtime.text import calibration_blocks, equal_length_batches, load_tokenizer
from surgery.runtime.weights import Loader, load_parameters, overridden_weights, parameter_aliases, set_parameter

__all__ = [
    "LayerStream", "Loader", "agreement", "build_model", "cache_kwargs", "calibration_blocks", "captured_inputs",
    "check_device",
    "compare_logits", "decoder_of", "equal_length_batches", "input_hooks", "kl_per_position", "load_parameters",
    "load_tokenizer", "loaded_model", "log_probs", "mean_kl", "one_torch_thread", "opened", "output_cache",
    "overridden_weights", "parameter_aliases", "sample", "sample_next", "sampled_ids", "seeded",
    "self_generated_ids", "self_generated_text", "set_parameter", "start_and_pad", "streamed_model",
    "tensor_seed", "top1_agreement",
]
