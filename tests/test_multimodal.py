"""Images, video and audio, exact to the reference: the processors' outputs on real inputs made
here (Pillow drawings and noise at odd sizes, espeak-ng speech, a 44.1 kHz tone sweep, a video
written with PyAV), and `Gemma4ForConditionalGeneration`'s logits on tiny checkpoints of both
sizes (E2B-like with audio; 31B- and 26B-A4B-like with image blocks that attend both ways)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import gemma4
from gemma4.errors import Gemma4Error
from gemma4.media.audio import RATE, clips, load_audio, log_mel
from gemma4.media.image import BUDGETS, POOL, image_patches
from gemma4.media.video import read_video, video_frames
from gemma4.model.multimodal import merge
from gemma4.runtime.generate import Session, sample_loop
from gemma4.runtime.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402

IMAGE, VIDEO, AUDIO, BOI, EOI, BOA, EOA = 258880, 258884, 258881, 255999, 258882, 256000, 258883


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    drawing = Image.new("RGBA", (211, 640), (255, 255, 255, 0))
    draw = ImageDraw.Draw(drawing)
    draw.ellipse((10, 20, 200, 300), fill=(200, 30, 30, 255))
    draw.rectangle((40, 350, 180, 600), outline=(0, 0, 200, 200), width=9)
    draw.text((20, 610), "Gemma 4", fill=(0, 0, 0, 255))
    return [
        Image.fromarray(rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)),  # photo-like noise, odd size
        drawing,  # transparency composited on white
        Image.fromarray(rng.integers(0, 256, (1080, 1920), dtype=np.uint8), "L"),  # grayscale, landscape
        Image.fromarray(rng.integers(0, 256, (40, 700, 3), dtype=np.uint8)),  # a strip: one token high
        Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)),  # tiny: scaled up
    ]


@pytest.mark.parametrize("budget", BUDGETS)
def test_image_patches_equal_the_reference_processor(budget):
    reference = Gemma4ImageProcessorPil()
    for image in images():
        theirs = reference.preprocess([image], max_soft_tokens=budget, return_tensors="pt")
        ours = image_patches(image, budget)
        assert int(theirs["num_soft_tokens_per_image"][0]) == ours.tokens <= budget
        assert torch.equal(theirs["pixel_values"][0], ours.pixels)
        assert torch.equal(theirs["image_position_ids"][0], ours.positions)


def speech(tmp_path) -> np.ndarray:
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "The quick brown fox jumps over the lazy dog."], check=True)
    return load_audio(wav)  # espeak-ng speaks at 22.05 kHz: resampled to 16 kHz


def sweep(seconds: float, rate: int = 44_100) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (100 + 1900 * t / seconds) * t)).astype(np.float32)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="Debian's espeak-ng is not installed (.ci/run installs it)")
def test_audio_features_equal_the_reference_extractor(tmp_path):
    reference = Gemma4AudioFeatureExtractor()
    for samples in (speech(tmp_path), load_audio_from(sweep(3.3)), np.zeros(4000, np.float32)):
        theirs = reference([samples], return_tensors="pt")
        ours = log_mel(samples)
        assert torch.equal(theirs["input_features"][0], ours.features)
        assert torch.equal(theirs["input_features_mask"][0], ours.mask)


def load_audio_from(samples: np.ndarray, rate: int = 44_100) -> np.ndarray:
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return load_audio(buffer.getvalue())


def test_long_audio_is_split_into_windows_not_cut():
    """The reference keeps the first 30 s and drops the rest without a word; we encode it all."""
    samples = load_audio_from(sweep(70.0))
    windows = clips(samples)
    assert [round(w.seconds, 2) for w in windows] == [30.0, 30.0, 10.0]
    reference = Gemma4AudioFeatureExtractor()([samples], return_tensors="pt")
    assert torch.equal(reference["input_features"][0], windows[0].features)  # its 30 s are our first window
    assert sum(w.tokens for w in windows) == 750 + 750 + 250


def reference_model(path, dtype=torch.float32):  # noqa: ANN001, ANN201
    return transformers.Gemma4ForConditionalGeneration.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


def image_prompt(model: gemma4.Model, budgets=(70, 140)) -> tuple[torch.Tensor, dict, list]:
    """Text, two images of different sizes and budgets, text: ids and the reference's inputs."""
    pictures = [image_patches(images()[0], budgets[0]), image_patches(images()[1], budgets[1])]
    ids = [2, 105, 1000, 1001, BOI, *[IMAGE] * pictures[0].tokens, EOI, 1002, BOI, *[IMAGE] * pictures[1].tokens, EOI, 1003, 106]
    width = max(len(p.pixels) for p in pictures)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, 0, 0, width - len(t)), value=v)  # noqa: E731
    inputs = {"pixel_values": torch.stack([pad(p.pixels, 0.0) for p in pictures]), "image_position_ids": torch.stack([pad(p.positions, -1) for p in pictures])}
    return torch.tensor([ids]), inputs, pictures


@pytest.mark.parametrize("preset", ["tiny-e2b-mm", "tiny-31b-mm", "tiny-26b-a4b-mm"])
def test_logits_with_images_equal_the_reference(checkpoints, preset):
    path = checkpoints(preset)
    model = gemma4.load(path, dtype=torch.float32, progress=False)
    ids, inputs, _ = image_prompt(model)
    types = (ids == IMAGE).long()  # as the processor returns them: 1 on image placeholders
    with torch.no_grad():
        truth = reference_model(path, torch.float64)(input_ids=ids, mm_token_type_ids=types, **{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}).logits
        theirs = reference_model(path)(input_ids=ids, mm_token_type_ids=types, **inputs).logits
    ours = model(ids, **inputs)
    reference_error = (theirs.double() - truth).abs().max().item()
    assert (ours.double() - truth).abs().max().item() <= 3 * reference_error, preset


def test_logits_with_audio_equal_the_reference(checkpoints):
    """The reference's audio attention computes in fp32 whatever the weights, so its fp64 run is
    no truth: ours in fp64 is, once it agrees with the reference's fp32 run to round-off."""
    path = checkpoints("tiny-e2b-mm")
    model = gemma4.load(path, dtype=torch.float32, progress=False)
    features = [log_mel(load_audio_from(sweep(s))) for s in (0.9, 0.5)]
    T = max(len(f.features) for f in features)
    inputs = {"input_features": torch.stack([torch.nn.functional.pad(f.features, (0, 0, 0, T - len(f.features))) for f in features]),
              "input_features_mask": torch.stack([torch.nn.functional.pad(f.mask, (0, T - len(f.mask))) for f in features])}
    ids = torch.tensor([[2, 105, 1000, BOA, *[AUDIO] * features[0].tokens, EOA, 1001, BOA, *[AUDIO] * features[1].tokens, EOA, 1002, 106]])
    with torch.no_grad():
        theirs = reference_model(path)(input_ids=ids, **inputs).logits
    ours = model(ids, **inputs)
    from gemma4.weights.checkpoint import load_encoders

    wide = gemma4.load(path, dtype=torch.float32, progress=False)
    wide.lm.to(torch.float64)
    wide._encoders = load_encoders(path, torch.float32).to(torch.float64)
    truth = wide(ids, input_features=inputs["input_features"].double(), input_features_mask=inputs["input_features_mask"])
    assert (theirs.double() - truth).abs().max() < 1e-4
    assert (ours.double() - truth).abs().max() <= 3 * (theirs.double() - truth).abs().max()


def write_video(path, frames: int = 40, rate: int = 10) -> None:  # noqa: ANN001
    import av

    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        for i in range(frames):
            picture = rng.integers(0, 256, (144, 176, 3), dtype=np.uint8)
            picture[:, : 4 * i % 176] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_frames_and_logits(checkpoints, tmp_path):
    path = checkpoints("tiny-31b-mm")
    write_video(tmp_path / "clip.mp4")
    frames, rate = read_video(tmp_path / "clip.mp4")
    assert len(frames) == 40 and rate == 10
    sampled = video_frames(frames, rate)
    assert sampled.seconds == [i * 40 // 32 / 10 for i in range(32)]
    model = gemma4.load(path, dtype=torch.float32, progress=False)
    prompt = model.chat_prompt([{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.mp4")}, {"type": "text", "text": "What happens?"}]}])
    text = model.tokenizer.decode(prompt.ids)
    assert "00:00 <|image><|video|>" in text and "00:03 <|image>" in text and text.count("<|video|>") == 32 * sampled.frames[0].tokens
    pixels = torch.stack([f.pixels for f in sampled.frames])
    positions = torch.stack([f.positions for f in sampled.frames])
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        theirs = reference_model(path)(input_ids=ids, pixel_values_videos=pixels, video_position_ids=positions,
                                      num_frames_per_video=torch.tensor([32]), mm_token_type_ids=(ids == VIDEO).long() * 2).logits
    ours = model.lm(ids, media=prompt.media)
    assert (ours - theirs).abs().max() < 1e-3


@pytest.mark.parametrize("preset", ["tiny-e2b-mm", "tiny-31b-mm"])
def test_chunked_and_token_by_token_with_images_equal_one_shot(checkpoints, preset):
    """Chunks of 5 never split an image block (it is fed whole); the cache then decodes as one full pass."""
    model = gemma4.load(checkpoints(preset), dtype=torch.float32, progress=False)
    ids, inputs, pictures = image_prompt(model)
    soft = model._require_encoders("image").images(inputs["pixel_values"], inputs["image_position_ids"])
    media = merge(ids, {IMAGE: soft}, model.config.hidden_size, model._vision_ids())
    full = model.lm(ids, media=media)[0]
    from gemma4.runtime.generate import Prompt

    session = Session(model.lm, 4096, prefill_chunk=5)
    logits, _ = session.start_prompt(Prompt(ids[0, :-3].tolist(), media.part(0, ids.shape[1] - 3)))
    out = [logits[0]]
    from gemma4.runtime.generate import decode_step

    for token in ids[0, -3:].tolist():
        out.append(decode_step(model.lm, [session], [token])[0])
    assert (torch.stack(out) - full[-4:]).abs().max() < 1e-4


def test_greedy_generation_with_an_image_equals_transformers(checkpoints, tmp_path):
    path = checkpoints("tiny-31b-mm")
    images()[0].save(tmp_path / "noise.png")
    model = gemma4.load(path, dtype=torch.float32, progress=False)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "noise.png"), "detail": "low"}},
                                             {"type": "text", "text": "Describe it."}]}]
    prompt = model.chat_prompt(messages)
    session = Session(model.lm, 4096)
    logits, history = session.start_prompt(prompt)
    ours = [int(t[0]) for t in sample_loop(session, logits, history, 12, SamplingParams(), (), ())]
    picture = image_patches(Image.open(tmp_path / "noise.png"), 70)
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        theirs = reference_model(path).generate(input_ids=ids, pixel_values=picture.pixels[None], image_position_ids=picture.positions[None],
                                                mm_token_type_ids=(ids == IMAGE).long(), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert ours == theirs[0, ids.shape[1] :].tolist()


def test_media_reach_the_prompt_as_the_processor_expands_them(checkpoints, tmp_path):
    model = gemma4.load(checkpoints("tiny-e2b-mm"), dtype=torch.float32, progress=False)
    images()[2].save(tmp_path / "gray.png")
    wav = tmp_path / "tone.wav"
    import soundfile

    soundfile.write(wav, sweep(1.0), 44_100)
    prompt = model.chat_prompt([{"role": "user", "content": [
        {"type": "image", "image": str(tmp_path / "gray.png")}, {"type": "text", "text": "and"}, {"type": "audio", "audio": str(wav)}]}],
        image_tokens=140)
    picture, sound = image_patches(images()[2], 140), clips(load_audio(wav))[0]
    expected = "<|image>" + "<|image|>" * picture.tokens + "<image|>"
    text = model.tokenizer.decode(prompt.ids)
    assert expected in text and "<|audio>" + "<|audio|>" * sound.tokens + "<audio|>" in text
    assert int(prompt.media.mask.sum()) == picture.tokens + sound.tokens
    # The same placeholders with other pixels are other tokens for the prefix cache.
    images()[0].save(tmp_path / "gray.png")
    other = model.chat_prompt([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "gray.png")}]}], image_tokens=140)
    first_image = prompt.ids.index(IMAGE)
    assert prompt.identity[first_image] != other.identity[first_image]


def test_models_refuse_media_they_cannot_read(checkpoints):
    text_only = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False)
    with pytest.raises(Gemma4Error, match="no encoder for image: it reads text"):
        text_only.chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/nowhere.png"}}]}])
    server = gemma4.load(checkpoints("tiny-31b-mm"), dtype=torch.float32, progress=False)
    with pytest.raises(Gemma4Error, match="no encoder for audio: it reads image, text, video"):
        server.chat_prompt([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])
    with pytest.raises(Gemma4Error, match="fetches nothing from the network"):
        server.chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    with pytest.raises(Gemma4Error, match="not one of 70, 140, 280, 560, 1120"):
        server.chat_prompt([{"role": "user", "content": [{"type": "image", "image": images()[4]}]}], image_tokens=100)


def test_encoders_load_only_for_media(checkpoints):
    model = gemma4.load(checkpoints("tiny-e2b-mm"), dtype=torch.float32, progress=False)
    model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
    assert model._encoders is None
    model.chat([{"role": "user", "content": [{"type": "image", "image": images()[4]}]}], max_new_tokens=2, image_tokens=70)
    assert model._encoders is not None


def test_wrong_config_types_are_one_line(tmp_path, checkpoints):
    import json

    from gemma4.config import ConfigError, ModelConfig

    raw = json.loads((checkpoints("tiny-e2b-mm") / "config.json").read_text())
    for where, key, value in (("text_config", "sliding_window", "x"), ("text_config", "head_dim", None), ("vision_config", "patch_size", 1.5)):
        broken = {**raw, where: {**raw[where], key: value}}
        with pytest.raises(ConfigError, match=f"{key} is {value!r}, which is not a valid"):
            ModelConfig.from_dict(broken)
    assert POOL == 3
    assert RATE == 16_000


def test_a_quantized_checkpoint_keeps_its_encoders_as_stored(checkpoints, tmp_path):
    from gemma4.weights.quantized import save_quantized

    source = checkpoints("tiny-e2b-mm")
    saved = save_quantized(source, tmp_path / "int4", "int4", progress=False)
    plain = gemma4.load(source, dtype=torch.float32, progress=False)
    packed = gemma4.load(saved, progress=False)
    picture = image_patches(images()[0], 70)
    args = (picture.pixels[None], picture.positions[None])
    assert torch.equal(packed._require_encoders("image").images(*args), plain._require_encoders("image").images(*args))
    answer = packed.chat([{"role": "user", "content": [{"type": "image", "image": images()[0]}, {"type": "text", "text": "Hi"}]}],
                         max_new_tokens=3, image_tokens=70)
    assert packed.media_costs == [f"image {picture.size[1]}x{picture.size[0]}: {picture.tokens} tokens"] and answer.content is not None


def test_the_plan_counts_the_encoders_as_they_load(checkpoints):
    from gemma4.config import ModelConfig
    from gemma4.planner import plan_memory
    from gemma4.weights.checkpoint import load_encoders
    from gemma4.weights.presets import preset_config

    config = ModelConfig.from_dict(preset_config("tiny-e2b-mm"))
    text_only, with_media = plan_memory(config, 512, dtype="fp32"), plan_memory(config, 512, dtype="fp32", media=True)
    loaded = load_encoders(checkpoints("tiny-e2b-mm", torch.bfloat16), torch.float32)  # released in bf16: matrices stay bf16
    for kind, tower in (("vision", ("vision_tower", "embed_vision")), ("audio", ("audio_tower", "embed_audio"))):
        held = sum(t.nbytes for n, t in loaded.state_dict().items() if n.startswith(tower))
        assert any(t.dtype == torch.bfloat16 for n, t in loaded.state_dict().items() if n.startswith(tower))
        assert with_media["weights"][kind] == held and kind not in text_only["weights"]
    assert with_media["encoders_on_disk"] == 0 < text_only["encoders_on_disk"]
    assert with_media["total_resident"] > text_only["total_resident"]


def test_synthetic_checkpoints_ship_what_the_reference_processor_loads(checkpoints):
    folder = checkpoints("tiny-e2b-mm")
    assert Gemma4ImageProcessorPil.from_pretrained(folder).max_soft_tokens == 280
    assert Gemma4AudioFeatureExtractor.from_pretrained(folder).feature_size == 128
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.image_token_id, tokenizer.boi_token, tokenizer.eoi_token) == (IMAGE, "<|image>", "<image|>")
    assert (tokenizer.audio_token, tokenizer.boa_token, tokenizer.eoa_token) == ("<|audio|>", "<|audio>", "<audio|>")


def test_process_returns_what_the_model_takes(checkpoints, tmp_path):
    model = gemma4.load(checkpoints("tiny-e2b-mm"), dtype=torch.float32, progress=False)
    messages = [{"role": "user", "content": [{"type": "image", "image": images()[0]}, {"type": "image", "image": images()[1]},
                                             {"type": "audio", "audio": load_audio_from(sweep(0.7))}, {"type": "text", "text": "Hi"}]}]
    tensors = model.process(messages, image_tokens=70)
    assert tensors["pixel_values"].shape[0] == 2 and tensors["input_features"].shape[0] == 1
    assert int((tensors["mm_token_type_ids"] == 1).sum()) == sum(image_patches(i, 70).tokens for i in (images()[0], images()[1]))
    logits = model(**{k: v for k, v in tensors.items() if k not in ("mm_token_type_ids", "attention_mask")})
    prompt = model.chat_prompt(messages, image_tokens=70)
    assert prompt.ids == tensors["input_ids"][0].tolist()
    assert (logits - model.lm(tensors["input_ids"], media=prompt.media)).abs().max() < 1e-4  # padded batch vs real patches only: round-off
