"""Running a model one decoder layer at a time, with input hooks.

Two ways, both on transformers' own modules (so family details — embedding scaling, sliding windows,
``layer_types``, q/k norms — are exactly transformers'):

- :func:`streamed_model`: transformers' forward runs unchanged; each piece (the embedding, every decoder layer, the
  final norm, the lm_head) is loaded by a forward pre-hook just before it runs and freed right after. For
  statistics of one pass over the data (AIM).
- :class:`LayerStream`: the layers are run by hand on captured inputs, so each layer can be run several times (with
  other weights, :func:`~surgery.runtime.weights.overridden_weights`) before the next one is loaded. For
  sequential calibration (GPTQ, selfcal).

:func:`input_hooks` captures what chosen modules receive in either. Memory: the largest of one decoder layer and
the embedding (:class:`LayerStream` keeps the embedding, final norm and head loaded), plus the activations.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from surgery.io.checkpoint import Checkpoint
from surgery.runtime.model import build_model, decoder_of, opened
from surgery.runtime.weights import Loader


def _streamed_pieces(model: nn.Module, decoder: nn.Module) -> list[nn.Module]:
    """The modules loaded one at a time: each decoder layer, the decoder's other children with parameters (the
    embedding, the final norm), and the lm_head."""
    pieces = []
    for child in decoder.children():
        if child is decoder.layers:
            pieces.extend(child)
        elif any(True for _ in child.parameters()):
            pieces.append(child)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        pieces.append(output)
    return pieces


@contextmanager
def streamed_model(source: str | Checkpoint, device: str = "cpu") -> Iterator[nn.Module]:
    """transformers' causal LM for ``source`` whose parameters stay on the meta device except while a piece runs.

    The embedding, each decoder layer, the final norm and the lm_head are loaded from the checkpoint by a forward
    pre-hook and freed by a forward hook. Run the decoder for hidden states (running the whole model also works, at
    the cost of the lm_head's logits).

    Args:
        source: a model source or an open checkpoint (left open).
        device: where pieces are loaded and run.

    Returns:
        A context manager yielding the model::

            with streamed_model("path/to/model") as model:
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    """
    with opened(source) as checkpoint:
        model = build_model(checkpoint.config, checkpoint.source, device)
        loader = Loader(model, checkpoint, device)
        handles = []
        for piece in _streamed_pieces(model, decoder_of(model, checkpoint.source)):
            handles.append(piece.register_forward_pre_hook(lambda module, args: loader.load(module)))
            handles.append(piece.register_forward_hook(lambda module, args, output: loader.free(module)))
        try:
            yield model
        finally:
            for handle in handles:
                handle.remove()
            loader.free(model)


@contextmanager
def input_hooks(root: nn.Module, callbacks: Mapping[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Call ``callbacks[name](x)`` with the input ``x`` of the submodule ``name`` of ``root`` each time it runs.

    ``x`` is the first positional argument, or the first tensor keyword argument when there is none.

    Args:
        root: the module the names are relative to (usually the model).
        callbacks: module name → function of the module's input.

    Returns:
        A context manager; the hooks are removed after it::

            seen = []
            with streamed_model("org/model") as model:
                with input_hooks(model, {"model.layers.0.mlp.down_proj": seen.append}):
                    model.get_decoder()(input_ids=ids, use_cache=False)
    """
    def hook(callback: Callable[[torch.Tensor], None]):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            callback(args[0] if args else next(value for value in kwargs.values() if torch.is_tensor(value)))

        return record

    handles = [root.get_submodule(name).register_forward_pre_hook(hook(callback), with_kwargs=True)
               for name, callback in callbacks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments transformers passes it (masks, rotary
    embeddings) and, for the first layer, the hidden states; passes the hidden states through."""

    def __init__(self, layer: nn.Module, record: dict, first: bool, inject: torch.Tensor | None = None):
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type
        self.record, self.first, self.inject = record, first, inject

    def forward(self, hidden_states, *args, **kwargs):
        self.record.setdefault("kwargs", []).append(kwargs)
        if self.first:
            self.record["hidden"] = hidden_states
            if self.inject is not None:
                return self.inject
        return hidden_states


@contextmanager
def _swapped_layers(decoder: nn.Module, replacement: list[nn.Module]) -> Iterator[None]:
    original = decoder.layers
    decoder.layers = nn.ModuleList(replacement)
    try:
        yield
    finally:
        decoder.layers = original


class _HeadReached(Exception):
    """Stops a forward pass at the lm_head (LayerStream.head_inputs)."""


def _output(result):
    return result[0] if isinstance(result, tuple) else result


class LayerStream:
    """transformers' causal LM for a checkpoint with parameters on meta: the embedding, final norm and lm_head loaded
    for the whole run, one decoder layer at a time otherwise; layers run by hand on captured inputs (CPU).

    Args:
        ckpt: the open checkpoint (with a config).
        chunk: sequences run through a layer at once.

    Example (a calibration method that sees every Linear's inputs, layer after layer)::

        stream = LayerStream(ckpt, chunk=8)
        hidden, kwargs = stream.layer_inputs(ids)              # per chunk: first layer's input, every layer's kwargs
        for index, layer in stream.each_layer():               # loaded, then freed after the body
            with input_hooks(stream.model, {name: observe(name) for name in stream.linears(index)}):
                hidden = [stream.run(index, h, kwargs[c]) for c, h in enumerate(hidden)]
        logits = stream.logits(ids[:1], hidden[0][:1])         # final norm, head, soft-capping: transformers'
    """

    def __init__(self, ckpt: Checkpoint, chunk: int):
        self.ckpt, self.chunk = ckpt, chunk
        self.model = build_model(ckpt.config, ckpt.source, "cpu")
        self.decoder = decoder_of(self.model, ckpt.source)
        self.loader = Loader(self.model, ckpt, "cpu")
        self.names = {id(module): name for name, module in self.model.named_modules()}
        self.layers = list(self.decoder.layers)
        self.layer_names = [self.names[id(layer)] for layer in self.layers]
        self.head = self.model.get_output_embeddings()
        for child in self.decoder.children():
            if child is not self.decoder.layers and any(True for _ in child.parameters()):
                self.loader.load(child)
        if self.head is not None:
            self.loader.load(self.head)

    def chunks(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """``ids`` cut into chunks of ``chunk`` sequences (the order :meth:`layer_inputs` keeps)."""
        return [ids[start:start + self.chunk] for start in range(0, ids.shape[0], self.chunk)]

    @torch.no_grad()
    def layer_inputs(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """Per chunk of ``ids``: the first layer's input hidden states and every layer's keyword arguments.

        Args:
            ids: (sequences, length) token ids.

        Returns:
            (hidden states per chunk, per chunk the keyword arguments of each layer)::

                hidden, kwargs = stream.layer_inputs(ids)
                out = stream.run(0, hidden[0], kwargs[0])
        """
        hidden, kwargs = [], []
        for chunk in self.chunks(ids):
            record: dict = {}
            catchers = [_Catcher(layer, record, index == 0) for index, layer in enumerate(self.layers)]
            with _swapped_layers(self.decoder, catchers):
                self.decoder(input_ids=chunk, use_cache=False)
            hidden.append(record["hidden"])
            kwargs.append(record["kwargs"])
        return hidden, kwargs

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits (final norm, lm_head, soft-capping: transformers' own) given the last layer's
        output ``final_hidden`` for ``ids``.

        Args:
            ids: the token ids the hidden states are of.
            final_hidden: the last decoder layer's output.

        Returns:
            (sequences, length, vocab) logits::

                log_p = torch.log_softmax(stream.logits(ids, hidden), -1)
        """
        record: dict = {}
        catchers = [_Catcher(layer, record, index == 0, final_hidden if index == 0 else None)
                    for index, layer in enumerate(self.layers)]
        with _swapped_layers(self.decoder, catchers):
            return self.model(input_ids=ids, use_cache=False).logits.float()

    @torch.no_grad()
    def head_inputs(self, ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor | None:
        """What the lm_head multiplies (the final norm's output: transformers' own path) given the last layer's
        output ``final_hidden`` for ``ids``; the head itself is not run (no vocabulary-wide logits). None when the
        model has no output embeddings.

        Args:
            ids: the token ids the hidden states are of.
            final_hidden: the last decoder layer's output.

        Returns:
            (sequences, length, hidden) float tensor, or None::

                x = stream.head_inputs(ids, hidden[0])      # its mean x² per column: the head's importance
        """
        if self.head is None:
            return None
        record: dict = {}

        def stop(module, args):
            record["inputs"] = args[0]
            raise _HeadReached

        catchers = [_Catcher(layer, {}, index == 0, final_hidden if index == 0 else None)
                    for index, layer in enumerate(self.layers)]
        handle = self.head.register_forward_pre_hook(stop)
        try:
            with _swapped_layers(self.decoder, catchers):
                self.model(input_ids=ids, use_cache=False)
        except _HeadReached:
            pass
        finally:
            handle.remove()
        return record.get("inputs")

    def load_layer(self, index: int) -> nn.Module:
        """Load decoder layer ``index`` from the checkpoint and return it (free it with :meth:`free_layer`)."""
        layer = self.layers[index]
        self.loader.load(layer)
        return layer

    def free_layer(self, index: int) -> None:
        """Put decoder layer ``index``'s parameters back on meta."""
        self.loader.free(self.layers[index])

    def each_layer(self) -> Iterator[tuple[int, nn.Module]]:
        """(index, layer) for every decoder layer in order, each loaded for the body of the loop and freed after.

        Returns:
            An iterator::

                for index, layer in stream.each_layer():
                    hidden = stream.run(index, hidden, kwargs)
        """
        for index in range(len(self.layers)):
            layer = self.load_layer(index)
            try:
                yield index, layer
            finally:
                self.free_layer(index)

    @torch.no_grad()
    def run(self, index: int, hidden: torch.Tensor, kwargs: list[dict]) -> torch.Tensor:
        """Decoder layer ``index`` (loaded) on ``hidden`` with that chunk's captured keyword arguments.

        Args:
            index: the layer.
            hidden: its input hidden states.
            kwargs: the chunk's keyword arguments of every layer (from :meth:`layer_inputs`).

        Returns:
            The layer's output hidden states::

                hidden = stream.run(index, hidden, kwargs[chunk])
        """
        return _output(self.layers[index](hidden, **kwargs[index]))

    def linears(self, index: int) -> dict[str, nn.Linear]:
        """Full name → module of every ``nn.Linear`` in decoder layer ``index``."""
        prefix = self.layer_names[index] + "."
        return {prefix + name: module for name, module in self.layers[index].named_modules()
                if isinstance(module, nn.Linear)}
