"""A local web page for trying a READ checkpoint: an image and a question in, the answer, the mask overlay,
the SasP points and the [SEG] similarity map out (Gradio, what LISA and its successors ship as their demo).

    python -m read_jax.cli.demo --checkpoint ckpt/read7b         # then open http://127.0.0.1:7860
    python -m read_jax.cli.demo --checkpoint runs/tiny_release   # any converted checkpoint, the tiny one too

PyTorch reference: READ's `demo.py` (an interactive loop: See / Say / Segment; read_reference.md §4). Each
request runs `read_jax.inference.predict`: greedy generation with the vicuna_v1 system prompt (READ's demo),
one full forward over prompt + answer, SasP points and SAM for every generated [SEG]. "Always segment"
skips generation and teacher-forces READ's evaluation answer ("Sure, the segmentation result is [SEG].") so
the page shows where the model would segment even when it does not emit a [SEG] itself (READ's README: the
user sometimes has to say "segment").

The page works offline: no analytics, no remote fonts, no share link.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from read_jax import visualize as V
from read_jax.data.conversation import ANSWER_TEMPLATE

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TITLE = "READ: reasoning segmentation"


def similarity_heatmap(image: np.ndarray, similarity: np.ndarray, cfg, alpha: float = 0.6) -> np.ndarray:
    """uint8[H, W, 3]: the first [SEG]'s similarity map at the image's size (the reference's `origin_sm`,
    `sasp.similarity_map_full`) as a jet heat map over the image."""
    import jax.numpy as jnp

    from read_jax import sasp

    h, w = image.shape[:2]
    hw = jnp.asarray([[h, w]], jnp.int32)
    m = sasp.similarity_map_full(
        jnp.asarray(similarity[:1], jnp.float32),
        hw,
        hw,
        (h, w),
        similarity_dtype=cfg.sasp.similarity_dtype,
        minmax_eps=cfg.sasp.minmax_eps,
        clip_grid=cfg.clip.grid_size,
        clip_size=cfg.clip.image_size,
    )[0]
    heat = V.jet(np.asarray(m))
    return np.clip((1 - alpha) * image + alpha * heat + 0.5, 0, 255).astype(np.uint8)


def respond_fn(model, tokenizer, *, template: str = "vicuna_v1", max_new_tokens: int = 256) -> Callable:
    """The page's handler: (image uint8[H, W, 3], question, always_segment) -> (answer, overlay, similarity
    map, summary dict). Pure Python over `inference.predict`: usable without a browser."""
    from read_jax.inference import overlay, predict

    def respond(image, question: str, always_segment: bool = False):
        if image is None:
            raise ValueError("upload an image first")
        question = (question or "").strip() or "Please segment the main object."
        image = np.ascontiguousarray(np.asarray(image, np.uint8)[..., :3])
        pred = predict(
            model,
            tokenizer,
            image,
            question,
            max_new_tokens=max_new_tokens,
            template=template,
            force_answer=ANSWER_TEMPLATE if always_segment else None,
        )
        ov = np.asarray(overlay(image, pred.masks, pred.points, pred.point_labels))
        sim = similarity_heatmap(image, pred.similarity, model.config) if len(pred.masks) else image
        pixels = [int(m.sum()) for m in pred.masks]
        labels = pred.point_labels[0] if len(pred.masks) else np.zeros((0,), np.int32)
        info = {
            "object_present": pred.object_present,
            "masks": len(pred.masks),
            "mask_pixels": pixels,
            "positive_points": int((labels == 1).sum()),
            "negative_points": int((labels == 0).sum()),
        }
        return pred.text, ov, sim, info

    return respond


def build_demo(model, tokenizer, **kw):
    """The Gradio Blocks page of `model` (launch it with `.launch(...)`, or `serve`)."""
    import gradio as gr

    respond = respond_fn(model, tokenizer, **kw)
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"## {TITLE}\nUpload an image, ask a question, press **Ask**.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="numpy", label="image", elem_id="read-image", height=320)
                question = gr.Textbox(label="question", elem_id="read-question", lines=2)
                force = gr.Checkbox(
                    label="Always segment (teacher-force a [SEG] answer)", elem_id="read-force"
                )
                ask = gr.Button("Ask", variant="primary", elem_id="read-ask")
            with gr.Column():
                answer = gr.Textbox(label="answer", elem_id="read-answer", interactive=False)
                info = gr.JSON(label="mask", elem_id="read-info")
        with gr.Row():
            # PNG: the page shows the overlay losslessly (Gradio's default is WebP).
            ov = gr.Image(
                label="mask + SasP points (green +, red -)", elem_id="read-overlay", height=320, format="png"
            )
            sim = gr.Image(label="[SEG] similarity map", elem_id="read-similarity", height=320, format="png")
        ask.click(respond, inputs=[image, question, force], outputs=[answer, ov, sim, info])
    return page


def serve(page, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Launch `page` on host:port without a share link or remote fonts; returns Gradio's (app, url, _)."""
    import gradio as gr

    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])
    return page.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        quiet=True,
        theme=theme,
    )
