"""The embedded sample dataset: a small MUGE in the exact file layout, drawn procedurally.

Products (dresses, T-shirts, backpacks, totes, sneakers, mugs, phone cases, caps) are drawn as
shapes in one of 10 colours and 4 patterns over varied backgrounds, sizes, positions and angles,
saved as 224x224 JPEG (plus a few PNG / grayscale / CMYK / palette files so the readers are
exercised). Queries are Chinese search phrases built from the attributes with synonyms and
filler words. Valid/test queries name two or three attributes and every gallery image that
matches is a positive, so same-category/other-colour images are near-miss distractors.
Deterministic for a seed: every image is drawn from its own (seed, split, index) stream.

`HARD` (`muge sample --hard`) keeps the layout and the generator but leaves the model headroom:
near shades of the colours (深蓝 beside 蓝色 and 天蓝), stripes and dots in two sizes, smaller
products under uneven light and more noise, often beside a smaller second product, and eval
queries that name every attribute, so each has few positives among many near-duplicates.
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
from dataclasses import dataclass
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from infra.io import atomic_path, atomic_write_text
from infra.outputs import OutputKind, check_output, write_marker

from .layout import SPLITS, split_paths
from .queries import Query, write_queries

COLOURS = {  # name -> (RGB, synonyms)
    "红色": ((206, 32, 41), ["红色", "红", "大红色"]),
    "黑色": ((28, 28, 30), ["黑色", "黑"]),
    "白色": ((246, 246, 244), ["白色", "白", "纯白"]),
    "蓝色": ((35, 85, 200), ["蓝色", "蓝", "宝蓝色"]),
    "绿色": ((40, 150, 70), ["绿色", "绿", "草绿色"]),
    "黄色": ((242, 200, 30), ["黄色", "黄", "明黄色"]),
    "粉色": ((245, 150, 190), ["粉色", "粉", "粉红色"]),
    "灰色": ((128, 128, 132), ["灰色", "灰", "浅灰色"]),
    "紫色": ((125, 55, 170), ["紫色", "紫", "香芋紫"]),
    "橙色": ((246, 130, 25), ["橙色", "橘色", "橙"]),
}
NEAR_SHADES = {  # HARD adds these beside COLOURS: each is close to one of them
    "深蓝色": ((22, 40, 110), ["深蓝色", "深蓝", "藏青色"]),
    "天蓝色": ((105, 170, 230), ["天蓝色", "天蓝", "浅蓝色"]),
    "酒红色": ((128, 22, 44), ["酒红色", "酒红", "枣红色"]),
    "米色": ((232, 218, 186), ["米色", "米白色", "奶白色"]),
    "卡其色": ((186, 156, 104), ["卡其色", "卡其"]),
    "墨绿色": ((22, 78, 50), ["墨绿色", "墨绿", "深绿色"]),
    "浅粉色": ((250, 200, 214), ["浅粉色", "浅粉", "樱花粉"]),
    "深灰色": ((72, 72, 76), ["深灰色", "深灰", "炭灰色"]),
}
PATTERNS = {  # name -> (how it is drawn, spacing range in px at 224, synonyms)
    "纯色": ("plain", (16, 28), ["纯色", "素色"]),
    "条纹": ("stripes", (16, 28), ["条纹", "竖条纹", "横条纹"]),
    "格子": ("check", (16, 28), ["格子", "格纹", "英伦格子"]),
    "波点": ("dots", (16, 28), ["波点", "圆点", "复古波点"]),
}
HARD_PATTERNS = {
    "纯色": ("plain", (16, 28), ["纯色", "素色"]),
    "细条纹": ("stripes", (9, 13), ["细条纹", "细条", "窄条纹"]),
    "宽条纹": ("stripes", (26, 36), ["宽条纹", "粗条纹", "宽条"]),
    "格子": ("check", (16, 28), ["格子", "格纹", "英伦格子"]),
    "小波点": ("dots", (10, 14), ["小波点", "小圆点", "碎点"]),
    "大波点": ("dots", (28, 38), ["大波点", "大圆点", "复古波点"]),
}
CATEGORIES = {
    "连衣裙": ["连衣裙", "裙子", "长裙"],
    "T恤": ["T恤", "短袖T恤", "体恤"],
    "双肩包": ["双肩包", "书包", "背包"],
    "托特包": ["托特包", "手提包", "单肩包"],
    "运动鞋": ["运动鞋", "跑步鞋", "休闲鞋"],
    "马克杯": ["马克杯", "水杯", "陶瓷杯"],
    "手机壳": ["手机壳", "保护壳", "手机套"],
    "帽子": ["帽子", "棒球帽", "鸭舌帽"],
}
PREFIXES = ["", "", "", "新款", "2024新款", "韩版", "ins风", "高级感", "夏季", "百搭", "简约", "网红", "日系", "复古"]
SUFFIXES = ["", "", "", "女", "男", "女夏", "学生", "潮", "大容量", "ins", "情侣", "小众设计", "清新", "正品"]
SIZE = 224


@dataclass(frozen=True)
class Difficulty:
    """What the generator draws from. `EASY` is the default sample; `HARD` leaves headroom."""
    colours: dict
    patterns: dict
    scale: tuple[float, float] = (0.6, 0.95)  # product size, fraction of the frame
    noise: int = 6                 # +- per-pixel noise
    lighting: float = 0.0          # up to this much brighter/darker product (a weaker colour cue)
    second_product: float = 0.0    # chance of a smaller other product in the picture
    full_queries: float = 0.55     # eval queries naming colour and pattern (else one of them)


EASY = Difficulty(COLOURS, PATTERNS)
HARD = Difficulty({**COLOURS, **NEAR_SHADES}, HARD_PATTERNS, scale=(0.45, 0.8), noise=14, lighting=0.25,
                  second_product=0.6, full_queries=0.9)


@dataclass(frozen=True)
class Product:
    img_id: int
    category: str
    colour: str
    pattern: str


# --- drawing ------------------------------------------------------------------------------------
def _shape_mask(category: str) -> Image.Image:
    """A white-on-black mask of the product, drawn upright in a SIZE x SIZE frame."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    P = lambda pts: [(x * SIZE, y * SIZE) for x, y in pts]  # noqa: E731
    if category == "连衣裙":
        d.polygon(P([(.40, .10), (.60, .10), (.64, .22), (.60, .40), (.80, .92), (.20, .92), (.40, .40),
                     (.36, .22)]), 255)
    elif category == "T恤":
        d.polygon(P([(.36, .14), (.64, .14), (.88, .30), (.78, .44), (.70, .38), (.70, .88), (.30, .88), (.30, .38),
                     (.22, .44), (.12, .30)]), 255)
    elif category == "双肩包":
        d.rounded_rectangle(P([(.24, .20), (.76, .88)]), radius=.12 * SIZE, fill=255)
        d.arc(P([(.36, .08), (.64, .32)]), 180, 360, fill=255, width=int(.04 * SIZE))
    elif category == "托特包":
        d.polygon(P([(.22, .36), (.78, .36), (.86, .88), (.14, .88)]), 255)
        d.arc(P([(.32, .14), (.68, .56)]), 180, 360, fill=255, width=int(.035 * SIZE))
    elif category == "运动鞋":
        d.polygon(P([(.10, .46), (.38, .40), (.50, .52), (.86, .60), (.92, .74), (.10, .74)]), 255)
        d.ellipse(P([(.08, .36), (.36, .62)]), 255)
    elif category == "马克杯":
        d.rectangle(P([(.24, .22), (.64, .84)]), 255)
        d.ellipse(P([(.56, .36), (.84, .68)]), 255)
        d.ellipse(P([(.62, .43), (.77, .61)]), 0)
    elif category == "手机壳":
        d.rounded_rectangle(P([(.32, .08), (.68, .92)]), radius=.07 * SIZE, fill=255)
        d.rounded_rectangle(P([(.38, .13), (.52, .29)]), radius=.03 * SIZE, fill=0)
    elif category == "帽子":
        d.chord(P([(.22, .22), (.78, .78)]), 180, 360, fill=255)
        d.polygon(P([(.50, .46), (.94, .50), (.90, .58), (.50, .56)]), 255)
        d.rectangle(P([(.22, .46), (.60, .56)]), 255)
    else:
        raise ValueError(category)
    return m


def _texture(rgb: tuple, pattern: tuple, rng: np.random.Generator) -> Image.Image:
    kind, (low, high), _ = pattern
    light = sum(rgb) > 600
    accent = (40, 40, 40) if light else (250, 250, 250)
    tex = Image.new("RGB", (SIZE, SIZE), rgb)
    d = ImageDraw.Draw(tex)
    step = int(rng.integers(low, high))
    if kind == "stripes":
        width = step // 2 - 2
        vertical = rng.random() < 0.5
        for p in range(0, SIZE, step):
            d.rectangle((p, 0, p + width, SIZE) if vertical else (0, p, SIZE, p + width), fill=accent)
    elif kind == "check":
        dark = tuple(int(c * 0.55) for c in rgb) if not light else (90, 90, 90)
        for p in range(0, SIZE, step):
            d.rectangle((p, 0, p + 5, SIZE), fill=dark)
            d.rectangle((0, p, SIZE, p + 5), fill=dark)
            d.line((p + step // 2, 0, p + step // 2, SIZE), fill=accent, width=1)
            d.line((0, p + step // 2, SIZE, p + step // 2), fill=accent, width=1)
    elif kind == "dots":
        r = max(3, step // 5)
        for y in range(0, SIZE, step):
            for x in range((y // step % 2) * step // 2, SIZE, step):
                d.ellipse((x - r, y - r, x + r, y + r), fill=accent)
    return tex


def _paste_product(canvas: Image.Image, p: Product, rng: np.random.Generator, d: Difficulty, scale_range,
                   shift) -> None:
    """Draw `p` onto `canvas` at a random size in `scale_range`, angle, and `shift(rng)` from the centre."""
    mask = _shape_mask(p.category)
    outline = mask.filter(ImageFilter.MaxFilter(5))
    layer = _texture(d.colours[p.colour][0], d.patterns[p.pattern], rng)
    scale = float(rng.uniform(*scale_range))
    angle = float(rng.uniform(-12, 12))
    offset = shift(rng)
    if d.lighting:
        gain = 1 + float(rng.uniform(-d.lighting, d.lighting))
        layer = Image.fromarray((np.asarray(layer, np.float32) * gain).clip(0, 255).astype(np.uint8), "RGB")

    def place(img: Image.Image, fill) -> Image.Image:
        size = max(8, int(SIZE * scale))
        img = img.resize((size, size), Image.BILINEAR).rotate(angle, resample=Image.BILINEAR, fillcolor=fill)
        out = Image.new(img.mode, (SIZE, SIZE), fill)
        out.paste(img, ((SIZE - size) // 2 + int(offset[0]), (SIZE - size) // 2 + int(offset[1])))
        return out

    shade = tuple(int(c) for c in rng.integers(20, 70, 3))
    canvas.paste(Image.new("RGB", (SIZE, SIZE), shade), (0, 0), place(outline, 0))
    canvas.paste(place(layer, (0, 0, 0)), (0, 0), place(mask, 0))


def draw_product(p: Product, rng: np.random.Generator, d: Difficulty = EASY) -> Image.Image:
    bg_top = rng.integers(185, 256, 3)
    bg_bottom = np.clip(bg_top - rng.integers(0, 40, 3), 150, 255)
    grad = np.linspace(0, 1, SIZE)[:, None, None]
    bg = (bg_top * (1 - grad) + bg_bottom * grad).astype(np.uint8).repeat(SIZE, axis=1)
    canvas = Image.fromarray(bg, "RGB")
    if d.second_product and rng.random() < d.second_product:  # smaller, off-centre, behind the product
        other = _products(rng, 1, iter([0]), d, exclude=p.category)[0]
        corner = lambda r: r.choice([-1, 1], 2) * r.integers(50, 76, 2)  # noqa: E731
        _paste_product(canvas, other, rng, d, (0.25, 0.4), corner)
    _paste_product(canvas, p, rng, d, d.scale, lambda r: r.integers(-18, 19, 2))
    arr = np.asarray(canvas).astype(np.int16) + rng.integers(-d.noise, d.noise + 1, (SIZE, SIZE, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def encode_product(p: Product, rng: np.random.Generator, odd: str | None, d: Difficulty = EASY) -> bytes:
    """JPEG bytes, or for `odd` products a valid but unusual file."""
    img = draw_product(p, rng, d)
    buf = io.BytesIO()
    if odd == "png-rgba":
        alpha = Image.new("L", img.size, 255)
        alpha.paste(0, (0, 0, SIZE, 12))  # a transparent strip to composite on white
        img.putalpha(alpha)
        img.save(buf, "PNG")
    elif odd == "gray":
        img.convert("L").save(buf, "JPEG", quality=90)
    elif odd == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=90)
    elif odd == "palette":
        img.convert("P", palette=Image.ADAPTIVE, colors=128).save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=int(rng.integers(82, 95)))
    return buf.getvalue()


def _render(args) -> str:
    seed, split, index, product, odd, difficulty = args
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    data = encode_product(product, rng, odd, difficulty)
    urlsafe = rng.random() < 0.5  # both base64 alphabets occur, as in the wild
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode("ascii")
    return f"{product.img_id}\t{text}\n"


# --- queries ------------------------------------------------------------------------------------
def _phrase(rng, d: Difficulty, category, colour=None, pattern=None) -> str:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    parts = []
    if colour:
        parts.append(pick(d.colours[colour][1]))
    if pattern:
        parts.append(pick(d.patterns[pattern][2]))
    if len(parts) == 2 and rng.random() < 0.25:
        parts.reverse()
    core = "".join(parts) + pick(CATEGORIES[category])
    text = pick(PREFIXES) + core + pick(SUFFIXES)
    if rng.random() < 0.1:
        text = text.replace(core, " " + core + " ").strip()
    return text


def _unique_text(rng, used: set, d: Difficulty, *attrs) -> str | None:
    for _ in range(50):
        text = _phrase(rng, d, *attrs)
        if text not in used:
            used.add(text)
            return text
    return None


def _products(rng, n: int, ids, d: Difficulty, exclude: str | None = None) -> list[Product]:
    cats, cols, pats = [c for c in CATEGORIES if c != exclude], list(d.colours), list(d.patterns)
    return [Product(int(next(ids)), cats[rng.integers(len(cats))], cols[rng.integers(len(cols))],
                    pats[rng.integers(len(pats))]) for _ in range(n)]


def _draws(out: list, n: int, kind: str, patience: int = 5_000):
    """Yield until `out` holds n queries; refuse, rather than loop forever, once `patience` draws
    in a row have added none (the phrase space or the gallery is exhausted)."""
    stalled, have = 0, len(out)
    while len(out) < n:
        yield
        stalled = 0 if len(out) > have else stalled + 1
        have = len(out)
        if stalled > patience:
            raise ValueError(f"could draw only {len(out)} of {n} distinct {kind} queries from the sample's phrases "
                             "and gallery: ask for fewer queries or a larger gallery")


def _eval_queries(rng, gallery: list[Product], n: int, used: set, qids, d: Difficulty) -> list[Query]:
    out = []
    for _ in _draws(out, n, "valid/test"):
        anchor = gallery[int(rng.integers(len(gallery)))]
        kind = rng.random()
        colour = anchor.colour if kind < 0.9 else None
        pattern = anchor.pattern if kind < d.full_queries or kind >= 0.9 else None
        pos = [p.img_id for p in gallery if p.category == anchor.category
               and (colour is None or p.colour == colour) and (pattern is None or p.pattern == pattern)]
        if len(pos) > 20:
            continue
        text = _unique_text(rng, used, d, anchor.category, colour, pattern)
        if text:
            out.append(Query(int(next(qids)), text, tuple(pos)))
    return out


def _train_queries(rng, gallery: list[Product], n: int, used: set, qids, d: Difficulty) -> list[Query]:
    by_combo: dict[tuple, list[int]] = {}
    for p in gallery:
        by_combo.setdefault((p.category, p.colour, p.pattern), []).append(p.img_id)
    out = []
    for _ in _draws(out, n, "train"):
        anchor = gallery[int(rng.integers(len(gallery)))]
        matches = by_combo[(anchor.category, anchor.colour, anchor.pattern)]
        k = min(len(matches), 1 + int(rng.random() < 0.5))  # a train query has 1-2 images
        pos = [anchor.img_id] + [m for m in rng.permutation(matches).tolist() if m != anchor.img_id][:k - 1]
        pattern = anchor.pattern if rng.random() < 0.85 else None
        text = _unique_text(rng, used, d, anchor.category, anchor.colour, pattern)
        if text:
            out.append(Query(int(next(qids)), text, tuple(int(i) for i in pos)))
    return out


def _id_stream(rng, low: int, high: int, n: int):
    return iter(rng.choice(np.arange(low, high), size=n, replace=False).tolist())


def _render_jobs(rng, galleries: dict, seed: int, odd_fraction: float, d: Difficulty) -> list[tuple]:
    """One `_render` job per image; about `odd_fraction` of them in an odd format (PNG with alpha,
    grayscale, CMYK, palette), as the real galleries hold a few."""
    odd_kinds = ["png-rgba", "gray", "cmyk", "palette"]
    jobs = []
    for split in SPLITS:
        for i, p in enumerate(galleries[split]):
            odd = None
            if rng.random() < odd_fraction:
                odd = odd_kinds[int(rng.integers(len(odd_kinds)))]
                if odd == "gray" and p.colour not in ("黑色", "白色", "灰色"):
                    odd = "png-rgba"
            jobs.append((seed, split, i, p, odd, d))
    return jobs


ATTRIBUTES = "sample_attributes.json"  # the drawn attributes: only a sample has them
SAMPLE = OutputKind("sample dataset", recognise=lambda path: os.path.isfile(os.path.join(path, ATTRIBUTES)))


def make_sample(out_dir, seed: int = 0, n_train_queries: int = 3000, n_eval_queries: int = 500,
                gallery_size: int = 1000, odd_fraction: float = 0.01, workers: int | None = None,
                difficulty: Difficulty = EASY, overwrite: bool | None = None) -> dict:
    """Write the six MUGE files plus `example_pred.jsonl` into `out_dir`: a new or empty directory,
    or an earlier sample (`infra.outputs`; anything else only with `overwrite`). Returns a summary."""
    t0 = time.time()
    # ids are drawn without replacement from fixed ranges; queries need enough distinct phrases
    if min(n_train_queries, n_eval_queries) < 1 or not 10 <= gallery_size <= 3_000_000 \
            or n_train_queries + 2 * n_eval_queries > 900_000 or n_train_queries > 100 * gallery_size \
            or n_eval_queries > 10 * gallery_size:
        raise ValueError(f"sample sizes out of range: {n_train_queries} train queries, {n_eval_queries} valid/test "
                         f"queries, {gallery_size} images per split (gallery 10..3,000,000; queries >= 1, at most "
                         "100 train and 10 valid/test per gallery image, 900,000 in all)")
    out_dir = os.fspath(out_dir)
    check_output(out_dir, SAMPLE, overwrite=overwrite, flag="OUT_DIR")
    os.makedirs(out_dir, exist_ok=True)
    write_marker(out_dir, SAMPLE)
    rng = np.random.default_rng(seed)
    img_ids = _id_stream(rng, 100_000, 9_999_999, 3 * gallery_size)
    qids = _id_stream(rng, 1_000, 999_999, n_train_queries + 2 * n_eval_queries)
    used: set[str] = set()
    d = difficulty
    galleries = {split: _products(rng, gallery_size, img_ids, d) for split in SPLITS}
    queries = {
        "train": _train_queries(rng, galleries["train"], n_train_queries, used, qids, d),
        "valid": _eval_queries(rng, galleries["valid"], n_eval_queries, used, qids, d),
        "test": _eval_queries(rng, galleries["test"], n_eval_queries, used, qids, d),
    }
    jobs = _render_jobs(rng, galleries, seed, odd_fraction, d)
    with Pool(workers or min(4, os.cpu_count() or 1)) as pool:
        lines = pool.map(_render, jobs, chunksize=32)
    start = 0
    for split in SPLITS:
        n = len(galleries[split])
        queries_path, tsv_path = split_paths(out_dir, split)
        with atomic_path(tsv_path) as tmp:
            with open(tmp, "w", encoding="ascii") as f:
                f.writelines(lines[start:start + n])
        start += n
        write_queries(queries_path, queries[split], with_ids=split != "test")
    test_ids = [p.img_id for p in galleries["test"]]
    example = [json.dumps({"query_id": q.query_id, "query_text": q.text,
                           "item_ids": [int(i) for i in rng.choice(test_ids, 10, replace=False)]},
                          ensure_ascii=False) for q in queries["test"]]
    atomic_write_text(os.path.join(out_dir, "example_pred.jsonl"), "\n".join(example) + "\n")
    # the hidden attributes, for analysis only (never read by the pipeline)
    attrs = {p.img_id: [p.category, p.colour, p.pattern] for s in SPLITS for p in galleries[s]}
    atomic_write_text(os.path.join(out_dir, ATTRIBUTES), json.dumps(attrs, ensure_ascii=False))
    positives = [len(q.item_ids) for q in queries["valid"]]
    return {"dir": out_dir, "difficulty": "hard" if d == HARD else "easy" if d == EASY else "custom",
            "seconds": round(time.time() - t0, 1),
            "queries": {s: len(q) for s, q in queries.items()},
            "images": {s: len(g) for s, g in galleries.items()},
            "valid_positives_mean": round(float(np.mean(positives)), 2)}
