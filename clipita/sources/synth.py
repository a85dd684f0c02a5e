"""A synthetic marketplace catalogue: a real-looking category tree, rendered product images, titles, attributes.

It is the demo's default catalogue and the tests' and benchmarks' input, so it must be learnable but not trivial:
- the image of a product depends on its path: the leaf's *name* picks a shape (so "Boots" look alike under Women
  and Men), the parent category a colour palette, the root a fill pattern; backgrounds, sizes, position,
  rotation, distractor shapes, grey-scale copies and file formats (JPEG, PNG with alpha, WebP) are noise;
- titles mix brands, colours, sizes and noise words with one of the leaf's nouns; about 10% name another
  category instead, and a few name none;
- 0-10 ``key: value`` attributes, correlated with the category (each leaf has typical values) but noisy;
- leaves get Zipf-like product counts, so some categories are rare.

Everything about product ``i`` comes from an RNG seeded by ``(seed, i)``, so the output is byte-identical for a
seed whatever the number of worker processes. ``products.parquet`` is written last: once it exists, every image
it names exists too.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageOps, features

from clipita import storage
from clipita.tree import CategoryTree

# The tree, two spaces per level; a leaf line is "Name: noun, noun, ..." (the words its titles use).
# Depths are 3 and 4; some names repeat under different parents (Boots, Accessories, Jeans, Toys, Beds...).
_TREE = """
Women
  Clothing
    Dresses: dress, maxi dress, midi dress, sundress, wrap dress
    Tops & Tees: top, t-shirt, tee, blouse, tank top
    Jeans: jeans, skinny jeans, denim, mom jeans
    Skirts: skirt, pleated skirt, mini skirt, midi skirt
    Coats & Jackets: coat, jacket, trench coat, puffer jacket, blazer
    Swimwear: swimsuit, bikini, one-piece, swim dress
    Activewear
      Leggings: leggings, yoga pants, tights
      Sports Bras: sports bra, workout bra, bralette
  Shoes
    Boots: boots, ankle boots, chelsea boots, knee high boots
    Sneakers: sneakers, trainers, running shoes, canvas shoes
    Sandals: sandals, slides, flip flops, espadrilles
    Heels: heels, pumps, stilettos, block heels
  Accessories
    Handbags: handbag, tote bag, shoulder bag, clutch, crossbody bag
    Scarves: scarf, shawl, wrap, bandana
    Sunglasses: sunglasses, shades, cat eye sunglasses
    Hats: hat, sun hat, beanie, beret
  Jewelry
    Necklaces: necklace, pendant, choker, chain
    Earrings: earrings, studs, hoops, drop earrings
    Rings: ring, band, engagement ring, stacking ring
Men
  Clothing
    Shirts: shirt, dress shirt, oxford shirt, flannel shirt
    T-Shirts: t-shirt, tee, crew neck tee, polo
    Jeans: jeans, slim fit jeans, straight jeans, denim
    Suits: suit, two-piece suit, tuxedo, suit jacket
    Coats & Jackets: jacket, coat, parka, bomber jacket
    Activewear
      Shorts: shorts, running shorts, gym shorts
      Track Pants: track pants, joggers, sweatpants
  Shoes
    Boots: boots, work boots, chelsea boots, chukka boots
    Sneakers: sneakers, trainers, running shoes, high tops
    Loafers: loafers, moccasins, slip-ons, boat shoes
    Dress Shoes: oxfords, derby shoes, brogues, dress shoes
  Accessories
    Wallets: wallet, bifold wallet, card holder, money clip
    Belts: belt, leather belt, reversible belt
    Ties: tie, necktie, bow tie, silk tie
    Watches: watch, wristwatch, chronograph, dive watch
Home & Kitchen
  Kitchen & Dining
    Cookware
      Frying Pans: frying pan, skillet, fry pan, wok
      Saucepans: saucepan, sauce pan, pot, stockpot
      Dutch Ovens: dutch oven, casserole, cocotte
    Small Appliances
      Blenders: blender, smoothie maker, hand blender
      Coffee Makers: coffee maker, espresso machine, drip coffee machine
      Toasters: toaster, 2-slice toaster, toaster oven
      Kettles: kettle, electric kettle, tea kettle
    Dinnerware: plates, dinner set, bowls, dinnerware set
    Cutlery: cutlery set, knives, flatware, chef knife
  Bedding
    Sheets: sheets, bed sheets, fitted sheet, sheet set
    Pillows: pillow, bed pillow, memory foam pillow
    Duvets: duvet, comforter, quilt, duvet cover
    Blankets: blanket, throw, fleece blanket
  Home Decor
    Vases: vase, flower vase, ceramic vase
    Candles: candle, scented candle, tealights, pillar candle
    Wall Art: wall art, canvas print, poster, framed print
    Clocks: wall clock, clock, alarm clock
    Mirrors: mirror, wall mirror, vanity mirror
  Furniture
    Chairs: chair, dining chair, office chair, armchair
    Tables: table, coffee table, side table, desk
    Shelves: shelf, bookcase, floating shelf, shelving unit
Electronics
  Computers & Accessories
    Laptops: laptop, notebook, ultrabook, chromebook
    Monitors: monitor, display, gaming monitor, 4k monitor
    Keyboards: keyboard, mechanical keyboard, wireless keyboard
    Mice: mouse, wireless mouse, gaming mouse, trackball
  Mobile Phones
    Smartphones: smartphone, phone, mobile phone, unlocked phone
    Accessories
      Cases: phone case, case, cover, flip case
      Chargers: charger, usb-c charger, fast charger, power adapter
      Screen Protectors: screen protector, tempered glass, film
  Audio
    Headphones: headphones, over-ear headphones, headset
    Earbuds: earbuds, wireless earbuds, in-ear headphones
    Speakers: speaker, bluetooth speaker, soundbar, smart speaker
  Cameras
    Digital Cameras: camera, digital camera, mirrorless camera, dslr
    Lenses: lens, zoom lens, prime lens, wide angle lens
  Wearables
    Smartwatches: smartwatch, smart watch, fitness watch
    Fitness Trackers: fitness tracker, activity tracker, step counter
  TV & Video
    Televisions: tv, television, smart tv, oled tv
    Projectors: projector, mini projector, home cinema projector
Sports & Outdoors
  Outdoor Recreation
    Camping
      Tents: tent, dome tent, camping tent, 4-person tent
      Sleeping Bags: sleeping bag, mummy bag, camping quilt
      Backpacks: backpack, hiking backpack, daypack, rucksack
    Hiking
      Boots: hiking boots, trail boots, boots, walking boots
      Trekking Poles: trekking poles, hiking poles, walking sticks
  Fitness
    Yoga Mats: yoga mat, exercise mat, pilates mat
    Dumbbells: dumbbells, dumbbell set, weights, kettlebell
    Resistance Bands: resistance bands, exercise bands, loop bands
  Cycling
    Bikes: bike, bicycle, mountain bike, road bike
    Helmets: helmet, bike helmet, cycling helmet
    Bike Lights: bike light, headlight, tail light, led light
  Team Sports
    Soccer
      Balls: soccer ball, football, match ball, training ball
      Cleats: cleats, football boots, soccer shoes
    Basketball
      Balls: basketball, ball, indoor basketball
      Hoops: basketball hoop, hoop, backboard
Toys & Games
  Building Toys
    Building Blocks: building blocks, bricks, block set
    Construction Sets: construction set, model kit, engineering kit
  Dolls & Accessories
    Dolls: doll, fashion doll, baby doll, rag doll
    Dollhouses: dollhouse, doll house, playhouse
    Accessories: doll clothes, doll accessories, doll furniture
  Games & Puzzles
    Board Games: board game, strategy game, family game
    Jigsaw Puzzles: jigsaw puzzle, puzzle, 1000 piece puzzle
    Card Games: card game, playing cards, trading cards
  Outdoor Play
    Kites: kite, stunt kite, delta kite
    Water Guns: water gun, squirt gun, water blaster
  Stuffed Animals
    Teddy Bears: teddy bear, teddy, bear plush
    Plush Toys: plush toy, plushie, stuffed animal, soft toy
Beauty & Personal Care
  Makeup
    Lips
      Lipstick: lipstick, matte lipstick, lip color
      Lip Gloss: lip gloss, lip oil, lip shine, lip balm
    Eyes
      Mascara: mascara, lash mascara, volumizing mascara
      Eyeshadow: eyeshadow, eyeshadow palette, eye palette
    Foundation: foundation, bb cream, concealer, tinted moisturizer
  Skin Care
    Moisturizers: moisturizer, face cream, day cream, lotion
    Cleansers: cleanser, face wash, cleansing gel
    Sunscreen: sunscreen, sun cream, spf 50, sunblock
  Hair Care
    Shampoo: shampoo, hair shampoo, dry shampoo
    Conditioner: conditioner, hair conditioner, hair mask
    Hair Dryers: hair dryer, blow dryer, hairdryer
  Fragrance
    Perfume: perfume, eau de parfum, fragrance
    Cologne: cologne, eau de toilette, aftershave
Pet Supplies
  Dogs
    Toys: dog toy, chew toy, squeaky toy, rope toy
    Beds: dog bed, orthopedic dog bed, pet bed
    Collars: dog collar, collar, harness, leash
    Food: dog food, dry dog food, puppy food, dog treats
  Cats
    Toys: cat toy, feather wand, catnip toy, laser toy
    Beds: cat bed, cat cave, pet bed
    Litter: cat litter, clumping litter, litter box
    Scratchers: cat scratcher, scratching post, cat tree
"""

# Brands per root; some non-ASCII, as on real marketplaces.
_BRANDS = {
    "Women": ["Lunaré", "Zoë & Co", "Maison Léa", "Velvetine", "Señorita Sol", "Åsa Design", "Kirra"],
    "Men": ["Hardwick", "Björn & Söhne", "Norte", "Ironside", "Crestline", "Dvořák Tailors"],
    "Home & Kitchen": ["CasaNova", "Küchenmeister", "Hearthly", "Maison Côté", "Oakridge", "Hygge Hjem"],
    "Electronics": ["Voltix", "Nexon", "Sōnik", "Pixelia", "Ampère", "Quantro"],
    "Sports & Outdoors": ["Trailblaze", "Alpenglüh", "Kinetix", "Peakform", "Fjällmark"],
    "Toys & Games": ["Bricktown", "Wunderkind", "Jouets Mélo", "小熊 Toys", "Playhaven"],
    "Beauty & Personal Care": ["Lumière", "Glowé", "Kaori 香", "Rosé Lab", "Belleza Pura"],
    "Pet Supplies": ["Pawsome", "Hundeglück", "Whisker & Co", "Fido's", "Mascotá"],
}

# Root-specific attributes (beyond brand, colour and pattern); each leaf favours two values of each key.
_ATTRIBUTES = {
    "Women": {"material": ["cotton", "polyester", "leather", "denim", "silk", "wool", "linen", "viscose"],
              "size": ["XS", "S", "M", "L", "XL", "XXL", "36", "38", "40", "42"],
              "style": ["casual", "elegant", "boho", "classic", "sporty", "vintage"],
              "season": ["spring", "summer", "autumn", "winter", "all seasons"],
              "fit": ["regular", "slim", "relaxed", "oversized"]},
    "Men": {"material": ["cotton", "polyester", "leather", "denim", "wool", "suede", "canvas"],
            "size": ["S", "M", "L", "XL", "XXL", "40", "42", "44", "46"],
            "style": ["casual", "formal", "business", "streetwear", "classic", "outdoor"],
            "season": ["spring", "summer", "autumn", "winter", "all seasons"],
            "fit": ["regular", "slim", "athletic", "loose"]},
    "Home & Kitchen": {"material": ["stainless steel", "cast iron", "ceramic", "glass", "wood", "cotton",
                                    "bamboo", "aluminium"],
                       "dimensions": ["20 x 20 cm", "30 x 40 cm", "45 x 45 cm", "140 x 200 cm", "1.5 l",
                                      "24 cm", "28 cm"],
                       "room": ["kitchen", "bedroom", "living room", "dining room", "office"],
                       "care": ["dishwasher safe", "hand wash", "machine washable", "wipe clean"]},
    "Electronics": {"connectivity": ["bluetooth 5.3", "wi-fi", "usb-c", "wired", "nfc", "hdmi"],
                    "battery": ["20 h", "30 h", "48 h", "5000 mAh", "none"],
                    "power": ["5 W", "20 W", "65 W", "100 W", "240 W"],
                    "warranty": ["1 year", "2 years", "3 years"],
                    "model year": ["2021", "2022", "2023", "2024"]},
    "Sports & Outdoors": {"material": ["nylon", "polyester", "aluminium", "rubber", "neoprene", "carbon"],
                          "size": ["S", "M", "L", "one size", "5", "7", "29 in"],
                          "weight": ["250 g", "500 g", "1 kg", "2.5 kg", "5 kg", "10 kg"],
                          "activity": ["running", "hiking", "camping", "yoga", "cycling", "football"]},
    "Toys & Games": {"age range": ["0-2 years", "3+ years", "6+ years", "8+ years", "12+ years"],
                     "material": ["plastic", "wood", "plush", "cardboard", "fabric"],
                     "players": ["1", "2", "2-4", "2-6", "4+"],
                     "pieces": ["12", "100", "500", "1000", "1500"]},
    "Beauty & Personal Care": {"skin type": ["all", "dry", "oily", "sensitive", "combination"],
                               "volume": ["15 ml", "30 ml", "50 ml", "100 ml", "250 ml"],
                               "finish": ["matte", "glossy", "satin", "natural", "dewy"],
                               "scent": ["unscented", "floral", "citrus", "vanilla", "woody"]},
    "Pet Supplies": {"pet size": ["small", "medium", "large", "all sizes"],
                     "material": ["nylon", "plush", "rubber", "rope", "memory foam", "clay"],
                     "life stage": ["puppy", "kitten", "adult", "senior", "all"],
                     "weight": ["1 kg", "2 kg", "5 kg", "10 kg", "15 kg"]},
}
_GENDER = {"Women": ["Women's", "Ladies", "Womens", "for Women"], "Men": ["Men's", "Mens", "for Men"]}
_ADJECTIVES = ["classic", "premium", "soft", "lightweight", "durable", "modern", "compact", "stylish",
               "comfortable", "waterproof", "handmade", "vintage", "slim", "portable", "luxury", "everyday"]
_NOISE = ["New", "2024", "Hot Sale", "Best Seller", "Free Shipping", "Gift", "Original", "Pack of 2",
          "Limited Edition", "Genuine", "Fast Delivery", "Top Rated", "✓", "★★★★★", "Upgraded", "Official"]

# Named colours: what images are drawn with, and the word titles and attributes use for them.
_COLOURS = {
    "red": (200, 30, 35), "crimson": (150, 15, 45), "orange": (240, 120, 20), "coral": (245, 110, 90),
    "yellow": (240, 210, 30), "mustard": (200, 160, 30), "olive": (110, 120, 40), "lime": (150, 210, 50),
    "green": (40, 150, 60), "teal": (20, 130, 130), "mint": (150, 225, 190), "turquoise": (50, 200, 200),
    "sky blue": (110, 180, 235), "blue": (30, 80, 200), "navy": (20, 30, 90), "purple": (110, 50, 160),
    "lavender": (185, 160, 225), "magenta": (200, 40, 150), "pink": (240, 150, 180), "brown": (115, 70, 35),
    "beige": (220, 200, 160), "grey": (128, 128, 128), "black": (25, 25, 25), "white": (245, 245, 245),
}
_COLOUR_NAMES = list(_COLOURS)
_PATTERNS = ["stripes", "checks", "dots", "diagonal", "grid", "waves", "rings", "crosshatch"]  # one per root
_PATTERN_WORDS = {"stripes": "striped", "checks": "checked", "dots": "polka dot", "diagonal": "diagonal stripe",
                  "grid": "grid", "waves": "wavy", "rings": "concentric", "crosshatch": "crosshatch",
                  "plain": "solid"}
_FORMATS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_ZIPF_EXPONENT = 0.9  # products per leaf ∝ 1 / rank^0.9 over a seeded ranking of the leaves
_CHUNK = 128  # products per task: small enough for steady progress, large enough to amortise task overhead
_SCHEMA = pa.schema([
    pa.field("product_id", pa.string(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("attributes", pa.list_(pa.string())),
    pa.field("category_path", pa.list_(pa.string())),
    pa.field("image", pa.string()),
])


def _parse_tree(text: str) -> tuple[list[tuple[str, ...]], dict[tuple[str, ...], list[str]]]:
    paths, nouns, stack = [], {}, []
    for line in text.strip("\n").splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name, _, words = line.strip().partition(":")
        stack[depth:] = [name]
        if words:
            path = tuple(stack)
            paths.append(path)
            nouns[path] = [w.strip() for w in words.split(",")]
    return paths, nouns


# CATEGORY_PATHS: every leaf path, root first (tuples of names); a product's ``category_path`` is one of them.
# NOUNS: leaf path -> the product nouns its titles use ("Boots" -> "ankle boots", ...).
CATEGORY_PATHS, NOUNS = _parse_tree(_TREE)
ROOTS = list(dict.fromkeys(p[0] for p in CATEGORY_PATHS))


def _stable_int(*parts: object) -> int:
    """A hash that, unlike ``hash()``, is the same in every process and run."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class _Shape:
    outer: tuple[tuple[float, float], ...]  # polygon in unit coordinates, about (0, 0), radius ~1
    hole: tuple[tuple[float, float], ...] | None  # cut out of the outer polygon (rings, frames)
    rotation: float  # degrees, before per-product jitter


def _regular(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(math.cos(2 * math.pi * k / n + phase), math.sin(2 * math.pi * k / n + phase)) for k in range(n)]


def _star(n: int, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = math.pi * k / n - math.pi / 2
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _superellipse(p: float, n: int = 36) -> list[tuple[float, float]]:
    pts = []
    for k in range(n):
        a = 2 * math.pi * k / n
        c, s = math.cos(a), math.sin(a)
        pts.append((math.copysign(abs(c) ** (2 / p), c), math.copysign(abs(s) ** (2 / p), s)))
    return pts


def _heart(n: int = 36) -> list[tuple[float, float]]:
    pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                       - math.cos(4 * t)))
           for t in (2 * math.pi * k / n for k in range(n))]
    return [(x / 17, (y + 2) / 17) for x, y in pts]


# Shape families the leaves draw from; a leaf name gets (family, aspect, rotation) distinct from its neighbours'.
_FAMILIES: list[tuple[list[tuple[float, float]], list[tuple[float, float]] | None]] = [
    (_superellipse(2), None),  # ellipse
    (_superellipse(6), None),  # rounded rectangle
    (_regular(4, math.pi / 4), None),  # rectangle
    (_regular(3, -math.pi / 2), None),  # triangle
    (_regular(5, -math.pi / 2), None),  # pentagon
    (_regular(6), None),  # hexagon
    (_star(5, 0.45), None),
    (_star(4, 0.35), None),
    (_star(8, 0.7), None),
    (_superellipse(0.8), None),  # astroid-like four-pointed curve
    ([(-0.35, -1), (0.35, -1), (0.35, -0.35), (1, -0.35), (1, 0.35), (0.35, 0.35), (0.35, 1), (-0.35, 1),
      (-0.35, 0.35), (-1, 0.35), (-1, -0.35), (-0.35, -0.35)], None),  # cross
    (_superellipse(2), _superellipse(2, 24)[::-1]),  # ring (hole scaled below)
    (_regular(4, math.pi / 4), _regular(4, math.pi / 4)),  # frame
    (_heart(), None),
    ([(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)], None),  # arrow
    ([(-0.5, -1), (0.5, -1), (1, 1), (-1, 1)], None),  # trapezoid
    ([(-1, -1), (1, -1), (0.1, 0), (1, 1), (-1, 1), (-0.1, 0)], None),  # hourglass
    ([(-1, -1), (-0.3, -1), (-0.3, 0.4), (1, 0.4), (1, 1), (-1, 1)], None),  # L
    ([(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)], None),  # T
    ([(math.cos(a), math.sin(a)) for a in np.linspace(0, math.pi, 18)], None),  # half disc
]
# Variants of a family: (width / height, rotation in degrees); aspects differ so round shapes differ too.
_VARIANTS = ((1.0, 0.0), (0.55, 30.0), (0.75, 90.0), (0.4, 0.0), (0.85, 45.0), (0.65, 90.0))


def _scaled(points: list[tuple[float, float]], sx: float, sy: float) -> tuple[tuple[float, float], ...]:
    return tuple((x * sx, y * sy) for x, y in points)


@lru_cache(maxsize=None)
def _shapes() -> dict[str, _Shape]:
    """Leaf name -> shape. Names are enumerated in a fixed shuffled order so that distinct names get distinct
    (family, aspect, rotation) combinations: no two leaves look alike by accident."""
    names = sorted({p[-1] for p in CATEGORY_PATHS}, key=lambda n: _stable_int("shape", n))
    out = {}
    for k, name in enumerate(names):
        outer, hole = _FAMILIES[k % len(_FAMILIES)]
        aspect, rotation = _VARIANTS[(k // len(_FAMILIES)) % len(_VARIANTS)]
        out[name] = _Shape(_scaled(outer, aspect, 1.0), _scaled(hole, 0.55 * aspect, 0.55) if hole else None,
                           rotation)
    return out


@lru_cache(maxsize=None)
def _palettes() -> dict[tuple[str, ...], tuple[str, str, str]]:
    """Parent path -> three colour names; parents take primary colours in turn so siblings differ."""
    parents = sorted({p[:-1] for p in CATEGORY_PATHS}, key=lambda p: _stable_int("palette", *p))
    out = {}
    for k, parent in enumerate(parents):
        primary = _COLOUR_NAMES[k % len(_COLOUR_NAMES)]
        rest = [c for c in _COLOUR_NAMES if c != primary]
        rng = np.random.default_rng(_stable_int("palette-rest", *parent))
        a, b = rng.choice(len(rest), size=2, replace=False)
        out[parent] = (primary, rest[a], rest[b])
    return out


def _typical(path: tuple[str, ...], key: str, values: list[str]) -> list[str]:
    """The two values of ``key`` a leaf favours (a wool coat, a ceramic vase...)."""
    i = _stable_int("typical", key, *path)
    return [values[i % len(values)], values[(i // len(values) + 1 + i) % len(values)]]


@lru_cache(maxsize=None)
def _leaf_weights(seed: int) -> np.ndarray:
    """Zipf-like share of products per leaf (in CATEGORY_PATHS order), the ranking shuffled by seed."""
    ranks = np.random.default_rng([seed, 0x7A1F]).permutation(len(CATEGORY_PATHS))
    w = 1.0 / (ranks + 1.0) ** _ZIPF_EXPONENT
    return w / w.sum()


# ---------------------------------------------------------------------------------------------- images


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore


def _place(points: tuple[tuple[float, float], ...], cx: float, cy: float, radius: float,
           degrees: float) -> list[tuple[float, float]]:
    a = math.radians(degrees)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in points]


def _pattern(kind: str, size: tuple[int, int], base: tuple, ink: tuple, rng: np.random.Generator) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, base)
    d = ImageDraw.Draw(img)
    step = max(4, int(min(w, h) * rng.uniform(0.07, 0.14)))
    width = max(1, step // 3)
    if kind == "stripes":
        for y in range(0, h, step):
            d.rectangle([0, y, w, y + width], fill=ink)
    elif kind == "checks":
        for y in range(0, h, step):
            for x in range((y // step) % 2 * step, w, 2 * step):
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)
    elif kind == "dots":
        r = max(1, step // 4)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif kind in ("diagonal", "crosshatch"):
        for x in range(-h, w, step):
            d.line([(x, h), (x + h, 0)], fill=ink, width=width)
            if kind == "crosshatch":
                d.line([(x, 0), (x + h, h)], fill=ink, width=width)
    elif kind == "grid":
        for v in range(0, max(w, h), step):
            d.line([(v, 0), (v, h)], fill=ink, width=1)
            d.line([(0, v), (w, v)], fill=ink, width=1)
    elif kind == "waves":
        xs = np.arange(0, w + 4, 4)
        for y0 in range(0, h + step, step):
            d.line([(float(x), y0 + step / 3 * math.sin(x / step * 2)) for x in xs], fill=ink, width=width)
    elif kind == "rings":
        cx, cy = w / 2, h / 2
        for r in range(step, int(max(w, h)), step):
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=ink, width=width)
    return img


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    u = rng.random()
    if u < 0.55:  # studio white / light grey, slightly tinted
        v = int(rng.integers(225, 256))
        return Image.new("RGB", size, _jitter((v, v, v), rng, 8))
    if u < 0.75:  # any light colour
        return Image.new("RGB", size, tuple(int(c) for c in rng.integers(150, 256, 3)))
    if u < 0.85:  # dark
        return Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 70, 3)))
    w, h = size
    ramp = np.linspace(0, 255, h if rng.random() < 0.5 else w).astype(np.uint8)
    ramp = np.broadcast_to(ramp[:, None] if len(ramp) == h else ramp[None, :], (h, w))
    lo, hi = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
    return ImageOps.colorize(Image.fromarray(np.ascontiguousarray(ramp)), lo, hi)


def _render(path: tuple[str, ...], rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """The product image, the name of its main colour and its fill pattern."""
    u = rng.random()
    if u < 0.05:
        w = h = int(rng.integers(48, 65))
    elif u < 0.15:
        long, short = int(rng.integers(128, 225)), rng.uniform(0.55, 0.8)
        w, h = (long, int(long * short)) if rng.random() < 0.5 else (int(long * short), long)
    else:
        w = h = int(rng.integers(96, 225))
    img = _background((w, h), rng)
    draw = ImageDraw.Draw(img)
    alpha = Image.new("L", (w, h), 0)  # object + distractor coverage, for PNG cut-outs
    adraw = ImageDraw.Draw(alpha)
    m = min(w, h)

    shapes = _shapes()
    for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):  # distractors: small props of any shape and colour
        other = shapes[CATEGORY_PATHS[int(rng.integers(len(CATEGORY_PATHS)))][-1]]
        pts = _place(other.outer, rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h,
                     m * rng.uniform(0.06, 0.14), rng.uniform(0, 360))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.polygon(pts, fill=colour)
        adraw.polygon(pts, fill=255)

    palette = _palettes()[path[:-1]]
    main = palette[int(rng.choice(3, p=[0.7, 0.2, 0.1]))]  # the parent's primary colour, usually
    second = palette[int(rng.integers(3))]
    base = _jitter(_COLOURS[main], rng, 20)
    # pattern ink: another palette colour, or a shade of the main one (the product stays mostly its colour)
    ink = _jitter(_COLOURS[second] if second != main else tuple(c // 2 + 40 for c in _COLOURS[main]), rng, 20)
    shape = shapes[path[-1]]
    radius = m * rng.uniform(0.24, 0.4)
    cx, cy = w / 2 + rng.uniform(-0.12, 0.12) * w, h / 2 + rng.uniform(-0.12, 0.12) * h
    angle = shape.rotation + rng.uniform(-20, 20)
    mask = Image.new("L", (w, h), 0)
    mdraw = ImageDraw.Draw(mask)
    mdraw.polygon(_place(shape.outer, cx, cy, radius, angle), fill=255)
    if shape.hole:
        mdraw.polygon(_place(shape.hole, cx, cy, radius, angle), fill=0)
    kind = _PATTERNS[ROOTS.index(path[0]) % len(_PATTERNS)] if rng.random() < 0.8 else "plain"
    img.paste(_pattern(kind, (w, h), base, ink, rng), (0, 0), mask)
    alpha.paste(255, (0, 0), mask)
    if rng.random() < 0.3:  # an outline, as product photos often have a darker rim
        ImageDraw.Draw(img).polygon(_place(shape.outer, cx, cy, radius, angle),
                                    outline=tuple(c // 3 for c in base), width=max(1, m // 60))
    if rng.random() < 0.1:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.5)))
    if rng.random() < 0.03:  # a photo that is not the product's own colour at all
        img = ImageOps.invert(img)
    img.putalpha(alpha)
    return img, main, kind


def _encode(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Most images RGB JPEG; some RGBA PNG cut-outs, some grey-scale, a few WebP (when Pillow has it)."""
    u = rng.random()
    buf = io.BytesIO()
    if u < 0.08:
        fmt = "png"
        img.save(buf, "PNG")
    elif u < 0.15:
        fmt = "jpeg"
        img.convert("L").save(buf, "JPEG", quality=int(rng.integers(70, 95)))
    elif u < 0.22 and features.check("webp"):
        fmt = "webp"
        img.convert("RGB").save(buf, "WEBP", quality=int(rng.integers(70, 95)))
    else:
        fmt = "jpeg"
        img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(70, 95)))
    return buf.getvalue(), fmt


# ---------------------------------------------------------------------------------------------- text


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _title(path: tuple[str, ...], brand: str, colour: str, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < 0.1:  # misleading: names another leaf's product
        noun = _pick(rng, NOUNS[CATEGORY_PATHS[int(rng.integers(len(CATEGORY_PATHS)))]])
    elif u < 0.13:  # names none: brand and a model code
        noun = f"{''.join(rng.choice(list('ABCDEFGHKLMNPRSTXZ'), 2))}-{int(rng.integers(10, 999))}"
    else:
        noun = _pick(rng, NOUNS[path])
    if rng.random() < 0.2:
        noun = noun.title()
    words = [brand] if rng.random() < 0.8 else []
    if path[0] in _GENDER and rng.random() < 0.6:
        words.append(_pick(rng, _GENDER[path[0]]))
    if rng.random() < 0.5:
        words.append(_pick(rng, _ADJECTIVES))
    if rng.random() < 0.7:
        words.append(colour)
    words.append(noun)
    attrs = _ATTRIBUTES[path[0]]
    if rng.random() < 0.4:
        key = _pick(rng, list(attrs))
        words.append(f"- {_pick(rng, attrs[key])}")
    for _ in range(int(rng.choice([0, 0, 0, 1, 1, 2]))):
        words.insert(int(rng.integers(len(words) + 1)), _pick(rng, _NOISE))
    if rng.random() < 0.08:  # a long, keyword-stuffed listing
        extra = rng.choice(len(_ADJECTIVES), size=int(rng.integers(5, 10)), replace=False)
        words += [",", *(_ADJECTIVES[i] for i in extra), "for home office travel gift", _pick(rng, _NOISE)]
    return " ".join(words).replace(" ,", ",")


def _attributes(path: tuple[str, ...], brand: str, colour: str, pattern: str,
                rng: np.random.Generator) -> list[str]:
    table = _ATTRIBUTES[path[0]]
    keys = ["brand", "color", "pattern", *table]
    n = min(len(keys), int(rng.binomial(10, 0.55)))  # 0-10 attributes, ~5.5 on average like the paper's data
    out = []
    for i in rng.permutation(len(keys))[:n]:
        key = keys[int(i)]
        if key == "brand":
            value = brand
        elif key == "color":
            value = colour if rng.random() < 0.85 else _pick(rng, _COLOUR_NAMES)
            key = "colour" if rng.random() < 0.1 else key  # sellers spell keys differently
        elif key == "pattern":
            value = _PATTERN_WORDS[pattern] if rng.random() < 0.8 else _pick(rng, list(_PATTERN_WORDS.values()))
        else:
            values = table[key]
            value = _pick(rng, _typical(path, key, values)) if rng.random() < 0.7 else _pick(rng, values)
        out.append(f"{key}: {value}")
    return out


# ---------------------------------------------------------------------------------------------- catalogue


def _product(seed: int, i: int) -> tuple[dict, bytes]:
    rng = np.random.default_rng([seed, i])
    path = CATEGORY_PATHS[int(rng.choice(len(CATEGORY_PATHS), p=_leaf_weights(seed)))]
    img, colour, pattern = _render(path, rng)
    data, fmt = _encode(img, rng)
    brand = _pick(rng, _BRANDS[path[0]]) if rng.random() < 0.95 else "Generic"
    row = {"product_id": f"P{i:07d}", "title": _title(path, brand, colour, rng),
           "attributes": _attributes(path, brand, colour, pattern, rng), "category_path": list(path),
           "image": f"images/{i:07d}.{_FORMATS[fmt]}", "format": fmt}
    return row, data


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _write_chunk(out: str, seed: int, start: int, stop: int) -> list[dict]:
    """Render and store products [start, stop); return their rows. Runs in a worker process."""
    fs, root = storage.filesystem(out)
    rows, blobs = [], {}
    for i in range(start, stop):
        row, data = _product(seed, i)
        rows.append(row)
        blobs[f"{root}/{row['image']}"] = data
    try:
        fs.pipe(blobs)  # one call: s3fs uploads the chunk concurrently
    except Exception as e:  # OSError, or botocore's own (missing credentials...): all mean "cannot write"
        raise storage.StorageError(f"cannot write images under {out}: {_first_line(e)}") from None
    return rows


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, _CHUNK):
        yield start, min(n, start + _CHUNK)


class _Progress:
    """A line on stderr at most every two seconds: products written / total and the rate."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.t0 = self.last = time.perf_counter()

    def update(self, k: int) -> None:
        self.done += k
        now = time.perf_counter()
        if self.enabled and (now - self.last >= 2.0 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"synth: {self.done:,}/{self.total:,} products ({rate:,.0f}/s)", file=sys.stderr, flush=True)


SELLERS = ("Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware")


def _with_duplicates(rows: list[dict], share: float, seed: int) -> list[dict]:
    """rows, each chosen one (a seeded ``share`` of them) followed by its second listing; every row gets a
    group_id (its own id, or the listed product's)."""
    rng = random.Random(f"{seed}-duplicates")
    out = []
    for r in rows:
        out.append(dict(r, group_id=r["product_id"]))
        if rng.random() < share:
            out.append(dict(r, product_id=f"{r['product_id']}-2", group_id=r["product_id"], duplicate=True,
                            title=f"{r['title']} - {rng.choice(SELLERS)}"))
    return out


def _mislabeled(rows: list[dict], share: float, seed: int) -> list[dict]:
    """A seeded ``share`` of the rows moved to another leaf category (a seller's mistake: the title and the image
    stay the product's); returns the moved rows' ids with their true paths."""
    rng = random.Random(f"{seed}-mislabel")
    moved = []
    for r in rows:
        if rng.random() < share:
            wrong = rng.choice([p for p in CATEGORY_PATHS if p[0] != r["category_path"][0]])  # another root
            moved.append({"product_id": r["product_id"], "category_path": r["category_path"]})
            r["category_path"] = list(wrong)
    return moved


MISLABELED_FILE = "mislabeled.parquet"  # clipita.stages.classify reads it: the labels corrupted on purpose


def write_catalog(out: str, n_products: int, seed: int = 0, workers: int | None = None,
                  progress: bool = True, duplicates: float = 0.0, mislabel: float = 0.0) -> dict:
    """Write a synthetic catalogue of ``n_products`` (images + ``products.parquet``) under ``out``.

    ``duplicates``: the share of products listed a second time by another seller (a new id, the same image
    file, the title with the seller's name), both rows sharing a ``group_id`` (the column is written only then);
    the products (and every figure of the demo, which lists none twice) are the same as without.
    ``mislabel``: the share of listings put under a leaf of another root on purpose (their title and image stay
    their own), recorded with the true paths in ``<out>/mislabeled.parquet``: the truth jobs.classify's
    mis-categorised listings are measured against.

    Returns summary counts. Raises ValueError for bad arguments and StorageError for an unusable ``out``.
    With ``workers`` > 1 it starts processes with "spawn": a calling script needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    if n_products < 1:
        raise ValueError(f"the number of products must be at least 1, got {n_products}")
    if seed < 0:
        raise ValueError(f"the seed must be a non-negative integer, got {seed}")
    if not 0.0 <= duplicates <= 1.0:
        raise ValueError(f"the share of duplicated products must be in [0, 1], got {duplicates}")
    if not 0.0 <= mislabel <= 1.0:
        raise ValueError(f"the share of mislabeled products must be in [0, 1], got {mislabel}")
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers < 1:
        raise ValueError(f"the number of workers must be at least 1, got {workers}")
    workers = min(workers, math.ceil(n_products / _CHUNK))  # no idle processes for small catalogues
    t0 = time.perf_counter()
    fs, root = storage.filesystem(out)  # a bad scheme fails here, before any work
    if not storage.is_remote(out):
        try:
            fs.makedirs(f"{root}/images", exist_ok=True)
        except OSError as e:
            raise storage.StorageError(f"cannot create {out}: {e.strerror or e}") from None

    meter = _Progress(n_products, progress)
    results: dict[int, list[dict]] = {}
    if workers == 1:
        for start, stop in _chunks(n_products):
            results[start] = _write_chunk(out, seed, start, stop)
            meter.update(stop - start)
    else:
        # spawn, not fork: the caller may have threads (Ray, s3fs's event loop) that fork would copy broken.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_write_chunk, out, seed, a, b): a for a, b in _chunks(n_products)}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    meter.update(len(results[futures[fut]]))
            except BaseException:
                pool.shutdown(cancel_futures=True)  # fail now, not after rendering every queued chunk
                raise
    rows = [r for start in sorted(results) for r in results[start]]
    moved = _mislabeled(rows, mislabel, seed) if mislabel > 0 else []
    schema = _SCHEMA
    if duplicates > 0:
        rows, schema = _with_duplicates(rows, duplicates, seed), _SCHEMA.append(pa.field("group_id", pa.string()))

    table = pa.table({name: [r[name] for r in rows] for name in schema.names}, schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    try:
        storage.write_bytes(storage.join(out, "products.parquet"), buf.getvalue().to_pybytes())
    except Exception as e:  # as in _write_chunk
        raise storage.StorageError(f"cannot write {out}/products.parquet: {_first_line(e)}") from None

    if mislabel > 0:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(moved, schema=pa.schema([("product_id", pa.string()), (
            "category_path", pa.list_(pa.string()))])), buf)
        storage.write_bytes(storage.join(out, MISLABELED_FILE), buf.getvalue().to_pybytes())
    seconds = time.perf_counter() - t0
    formats = {f: sum(r["format"] == f for r in rows if not r.get("duplicate")) for f in _FORMATS}
    tree = CategoryTree(r["category_path"] for r in rows).summary()  # the categories that got products
    return {"out": out, "products": n_products, "seed": seed, **tree, "images": formats,
            "duplicates": sum(bool(r.get("duplicate")) for r in rows), "mislabeled": len(moved),
            "seconds": round(seconds, 2), "products_per_s": round(n_products / seconds, 1)}
