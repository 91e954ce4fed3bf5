"""CLIP-Dissect soft-WPMI naming: planted concepts, a brute-force formula check, a tiny offline
transformers CLIP (random weights, tokenizer from files written here) and a tiny random open_clip
model (its real transform and tokenizer), loading both from local folders, the vocabulary and
names files, and input validation."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
from fact_model_helpers import backbone, fact, images

from fact_model.concepts import LayerConcepts
from fact_model.data import IndexedImages, TensorImages, eval_transform_for
from fact_model.naming import (
    check_clip_spec,
    clip_embeddings,
    load_clip,
    load_names,
    name_concepts,
    name_from_similarity,
    read_vocabulary,
    save_names,
    soft_wpmi,
)


def _planted(seed: int = 0):
    """Word j is more similar exactly on the images where concept j is active; two distractor
    words are more similar on every image (globally popular), by more than the planted gap."""
    g = torch.Generator().manual_seed(seed)
    n, k, n_noise = 240, 4, 6
    act = 0.01 * torch.rand(n, k, generator=g)
    active = torch.zeros(n, k, dtype=torch.bool)
    perm = torch.randperm(n, generator=g)
    for j in range(k):
        rows = perm[40 * j : 40 * (j + 1)]
        active[rows, j] = True
        act[rows, j] += 1 + torch.rand(40, generator=g)
    v = k + 2 + n_noise
    sim = 0.2 + 0.01 * torch.randn(n, v, generator=g)
    sim[:, :k] += 0.05 * active.float()
    sim[:, k : k + 2] += 0.08  # popular distractors
    words = [f"planted{j}" for j in range(k)] + ["popular0", "popular1"]
    words += [f"noise{i}" for i in range(n_noise)]
    return sim, act, words


def test_soft_wpmi_picks_planted_words_where_top_image_mean_picks_popular_ones() -> None:
    sim, act, words = _planted()
    res = name_from_similarity(sim, act, words, top_k=30, return_matrix=True)
    assert res.names == [f"planted{j}" for j in range(4)]
    assert res.word_ids.tolist() == [0, 1, 2, 3]
    assert res.matrix is not None and res.matrix.shape == (4, len(words))
    torch.testing.assert_close(res.scores, res.matrix.max(1).values)
    # A naive "mean similarity on the top images" picks a globally popular word instead.
    idx = act.topk(30, dim=0).indices.T  # (K, q)
    naive = sim[idx].mean(1).argmax(1)
    assert all(words[i].startswith("popular") for i in naive.tolist())
    # Without the prior term (lam = 0) the popular words win too: lam matters.
    no_prior = name_from_similarity(sim, act, words, top_k=30, lam=0.0)
    assert all(w.startswith("popular") for w in no_prior.names)
    assert name_from_similarity(sim, act, words, top_k=30).matrix is None


def _brute(sim, act, top_k, a, lam, min_prob, p_start, p_end):
    n, v = sim.shape
    k = act.shape[1]
    prob = [[0.0] * v for _ in range(n)]
    for i in range(n):
        e = [math.exp(a * float(sim[i, w])) for w in range(v)]
        prob[i] = [x / sum(e) for x in e]
    cond = [[0.0] * v for _ in range(k)]
    for c in range(k):
        order = sorted(range(n), key=lambda i: -float(act[i, c]))[:top_k]
        for w in range(v):
            cond[c][w] = sum(
                math.log(
                    1 + (p_start - j / top_k * (p_start - p_end)) * (prob[i][w] - 1) + min_prob
                )
                for j, i in enumerate(order)
            )
    out = torch.zeros(k, v, dtype=torch.float64)
    for w in range(v):
        m = max(cond[c][w] for c in range(k))
        prior = m + math.log(sum(math.exp(cond[c][w] - m) for c in range(k))) - math.log(k)
        for c in range(k):
            out[c, w] = cond[c][w] - lam * prior
    return out


@pytest.mark.parametrize(
    "kw", [dict(top_k=5), dict(top_k=4, a=3.0, lam=0.6, min_prob=1e-4, p_start=0.9, p_end=0.5)]
)
def test_soft_wpmi_equals_brute_force(kw) -> None:
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(11, 7, generator=g) * 2 - 1
    act = torch.randn(11, 3, generator=g)
    full = dict(top_k=100, a=10.0, lam=1.0, min_prob=1e-7, p_start=0.998, p_end=0.97) | kw
    torch.testing.assert_close(soft_wpmi(sim, act, **kw), _brute(sim, act, **full))


def test_top_k_larger_than_n_is_clamped() -> None:
    g = torch.Generator().manual_seed(4)
    sim, act = torch.rand(6, 5, generator=g), torch.randn(6, 2, generator=g)
    want = _brute(sim, act, 6, 10.0, 1.0, 1e-7, 0.998, 0.97)
    torch.testing.assert_close(soft_wpmi(sim, act), want)  # default top_k=100 > N=6


def test_validation_errors() -> None:
    sim, act = torch.rand(5, 3), torch.rand(5, 2)
    with pytest.raises(ValueError, match="images but activations"):
        soft_wpmi(sim, torch.rand(4, 2))
    with pytest.raises(ValueError, match="2-D"):
        soft_wpmi(sim[0], act)
    with pytest.raises(ValueError, match="non-finite"):
        soft_wpmi(torch.full((5, 3), math.nan), act)
    with pytest.raises(ValueError, match="top_k"):
        soft_wpmi(sim, act, top_k=0)
    with pytest.raises(ValueError, match="min_prob"):
        soft_wpmi(sim, act, min_prob=0)
    with pytest.raises(ValueError, match="p_start"):
        soft_wpmi(sim, act, p_start=1.5)
    with pytest.raises(ValueError, match="3 words but 2"):
        name_from_similarity(sim, act, ["a", "b"])


# ----------------------------------------------------------------------------- tiny CLIP
def _tiny_clip(tmp: Path):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab |= {c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=32, bos_token_id=52,
            eos_token_id=53, pad_token_id=53,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=8,
    )  # fmt: skip
    model = CLIPModel(cfg).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=ip, tokenizer=tok)


def test_clip_embeddings_shapes_normalisation_and_batching(tmp_path: Path) -> None:
    model, proc = _tiny_clip(tmp_path)
    x = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    words = ["dog", "cat", "red car", "sky"]
    img, txt = clip_embeddings(model, proc, x, words, batch_size=2)
    assert img.shape == (5, 8) and txt.shape == (4, 8)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(4))
    img1, txt1 = clip_embeddings(model, proc, x, words, batch_size=64)
    torch.testing.assert_close(img, img1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, txt1, atol=1e-5, rtol=1e-5)
    # Equal to the model called directly on the processed inputs.
    with torch.no_grad():
        pix = proc.image_processor(images=list(x), do_rescale=False, return_tensors="pt")
        out = model.get_image_features(pixel_values=pix["pixel_values"])
        direct = getattr(out, "pooler_output", out)
        enc = proc.tokenizer(["sky"], return_tensors="pt")
        t = model.get_text_features(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        )
        t = getattr(t, "pooler_output", t)
    torch.testing.assert_close(
        img, torch.nn.functional.normalize(direct, dim=1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        txt[3:], torch.nn.functional.normalize(t, dim=1), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(txt[0], txt[1]) and not torch.allclose(img[0], img[1])
    with pytest.raises(ValueError, match="RGB"):
        clip_embeddings(model, proc, torch.rand(2, 6, 8, 8), words)
    with pytest.raises(ValueError, match="not one string"):
        clip_embeddings(model, proc, x, "dog")
    with pytest.raises(ValueError, match="non-empty"):
        clip_embeddings(model, proc, x, [])
    with pytest.raises(ValueError, match="batch_size"):
        clip_embeddings(model, proc, x, words, batch_size=0)


def test_name_concepts_on_a_dataset_equals_the_parts(tmp_path: Path) -> None:
    clip, proc = _tiny_clip(tmp_path)
    model = fact("resnet")
    n = 9
    data = IndexedImages(
        TensorImages(images(n, seed=7)[:, :3], torch.arange(n) % 3),
        eval_transform_for(backbone("resnet")),
    )
    concepts = LayerConcepts(model, "layer3")
    words = ["dog", "cat", "tree", "sky", "road"]
    res = name_concepts(
        concepts, data, words, clip, proc, batch_size=4, progress=False, top_k=3,
        return_matrix=True,
    )  # fmt: skip
    x = torch.stack([data[i][0] for i in range(n)])
    with torch.no_grad():
        pres = concepts.presence(x).double()
    img, txt = clip_embeddings(clip, proc, x[:, :3], words)
    want = name_from_similarity(img @ txt.T, pres, words, top_k=3, return_matrix=True)
    assert res.names == want.names and len(res.names) == concepts.n_concepts
    torch.testing.assert_close(res.matrix, want.matrix, atol=1e-6, rtol=1e-6)
    sub = name_concepts(
        concepts, data, words, clip, proc, indices=[0, 2, 4, 6], progress=False, top_k=2
    )
    want_sub = name_from_similarity((img @ txt.T)[[0, 2, 4, 6]], pres[[0, 2, 4, 6]], words, top_k=2)
    torch.testing.assert_close(sub.scores, want_sub.scores, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- tiny open_clip
OPEN_CLIP_CFG = dict(
    embed_dim=16,
    vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)


def _tiny_open_clip():
    """A random open_clip CLIP with its real eval transform and tokenizer (all offline)."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**OPEN_CLIP_CFG).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    return model, (preprocess, open_clip.SimpleTokenizer(context_length=16))


def _open_clip_direct(model, preprocess, tokenizer, x, words):
    """What open_clip's own usage computes: PIL pictures -> preprocess -> encode, normalised."""
    from PIL import Image

    pics = [
        Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy(), mode="RGB") for im in x
    ]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(p) for p in pics]))
        txt = model.encode_text(tokenizer(words))
    return (torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1))


def test_open_clip_embeddings_equal_encode_image_and_encode_text() -> None:
    model, (pre, tok) = _tiny_open_clip()
    x = torch.rand(5, 3, 40, 36, generator=torch.Generator().manual_seed(2))
    words = ["dog", "cat", "red car", "sky"]
    img, txt = clip_embeddings(model, (pre, tok), x, words, batch_size=2)
    assert img.shape == (5, 16) and txt.shape == (4, 16)
    want_img, want_txt = _open_clip_direct(model, pre, tok, x, words)
    torch.testing.assert_close(img, want_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, want_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(5))
    assert not torch.allclose(txt[0], txt[1]) and not torch.allclose(img[0], img[1])
    # a list works as the pair too; anything else is refused with what to pass
    img2, _ = clip_embeddings(model, [pre, tok], x[:2], words)
    torch.testing.assert_close(img2, img[:2], atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match=r"pair \(preprocess, tokenizer\)"):
        clip_embeddings(model, pre, x, words)


def test_name_concepts_through_open_clip_equals_the_parts() -> None:
    clip, proc = _tiny_open_clip()
    model = fact("resnet")
    n = 10
    data = IndexedImages(
        TensorImages(images(n, seed=8)[:, :3], torch.arange(n) % 3),
        eval_transform_for(backbone("resnet")),
    )
    concepts = LayerConcepts(model, "layer3")
    words = ["dog", "cat", "tree", "sky", "road", "wheel"]
    res = name_concepts(
        concepts, data, words, clip, proc, batch_size=4, progress=False, top_k=3,
        return_matrix=True,
    )  # fmt: skip
    x = torch.stack([data[i][0] for i in range(n)])
    with torch.no_grad():
        pres = concepts.presence(x).double()
    img, txt = _open_clip_direct(clip, *proc, x[:, :3], words)
    want = name_from_similarity(img @ txt.T, pres, words, top_k=3, return_matrix=True)
    assert res.names == want.names and len(res.names) == concepts.n_concepts
    assert set(res.names) <= set(words)
    torch.testing.assert_close(res.matrix, want.matrix, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- loading
def test_load_clip_open_clip_folder_and_transformers_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, (pre, tok) = _tiny_open_clip()
    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    save_file(model.state_dict(), oc / "open_clip_model.safetensors")
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    words = ["dog", "sky"]
    assert check_clip_spec(f"open_clip:{oc}") == f"open_clip {oc.resolve()}"
    loaded, proc = load_clip(f"open_clip:{oc}")
    assert not loaded.training and isinstance(proc, tuple) and len(proc) == 2
    for a, b in zip(
        clip_embeddings(loaded, proc, x, words), clip_embeddings(model, (pre, tok), x, words)
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    tf_model, tf_proc = _tiny_clip(tmp_path)
    saved = tmp_path / "hf"
    tf_model.save_pretrained(saved)
    tf_proc.save_pretrained(saved)
    loaded, proc = load_clip(str(saved))
    assert not loaded.training
    for a, b in zip(
        clip_embeddings(loaded, proc, x, words), clip_embeddings(tf_model, tf_proc, x, words)
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clip_specs_that_cannot_load_say_why(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*Hub id is not downloaded"):
        check_clip_spec(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        check_clip_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model, not a CLIP"):
        load_clip(str(tmp_path))
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match="nothing is downloaded"):
        check_clip_spec("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        check_clip_spec(f"open_clip:NoSuchNet:{tmp_path / 'w.bin'}")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .* does not exist"):
        check_clip_spec(f"open_clip:ViT-B-32:{tmp_path / 'w.bin'}")
    with pytest.raises(FileNotFoundError, match="not a folder, and not ARCH:FILE"):
        check_clip_spec(f"open_clip:{tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match=r"no open_clip_config\.json"):
        check_clip_spec(f"open_clip:{tmp_path}")
    with pytest.raises(ValueError, match="empty CLIP model spec"):
        check_clip_spec(" ")


# ----------------------------------------------------------------------------- files
def test_read_vocabulary(tmp_path: Path) -> None:
    f = tmp_path / "words.txt"
    f.write_text("\ufeffdog\n  red car \n\ncat\ndog\n\t\n", encoding="utf-8")
    assert read_vocabulary(f) == ["dog", "red car", "cat"]
    f.write_text("\n \n")
    with pytest.raises(ValueError, match="has no words"):
        read_vocabulary(f)
    f.write_bytes(b"\xff\xfe\x00d")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_vocabulary(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_vocabulary(tmp_path / "none.txt")


def test_names_file_round_trip_and_checks(tmp_path: Path) -> None:
    sim, act, words = _planted()
    res = name_from_similarity(sim, act, words, top_k=30)
    path = save_names(tmp_path / "names_l.json", res, layer="l", meta={"n_words": len(words)})
    rec = load_names(path)
    assert rec["names"] == res.names and rec["layer"] == "l" and rec["kind"] == "sae"
    assert rec["scores"] == res.scores.tolist() and rec["word_ids"] == res.word_ids.tolist()
    assert rec["n_words"] == len(words) and rec["format"] == "fact-concept-names"
    for edit, match in [
        (lambda r: r.update(format="other"), "not a concept names file"),
        (lambda r: r.update(version=9), "version 9"),
        (lambda r: r.update(scores=r["scores"][:-1]), "as many finite 'scores'"),
        (lambda r: r.update(names=[""] * len(r["names"])), "non-empty strings"),
        (lambda r: r.update(kind="pixels"), "'kind' of sae or channels"),
    ]:
        bad = dict(rec)
        edit(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_names(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_names(tmp_path / "bad.json")
