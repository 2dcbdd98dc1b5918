#!/usr/bin/env python3
"""Generate the tokenizer golden corpus: varied strings and the ids Hugging Face `tokenizers`
gives them with DeepSeek V4's tokenizer.json.

Output: tests/fixtures/text/tokenizer_corpus.jsonl, one JSON object per line:
    {"kind": "<category>", "text": "<string>", "ids": [..]}
The Rust test (crates/ds4-text/tests/tokenizer_corpus.rs) checks that both ways of building the
tokenizer give these exact ids and that decode(encode(text)) == text.

Deterministic: fixed seed, no network. Usage (from the repository root):
    python3 scripts/text/make_tokenizer_corpus.py [--tokenizer tests/fixtures/tokenizer/tokenizer.json]
"""

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer

SEED = 20260521
ROOT = Path(__file__).resolve().parents[2]

ENGLISH_WORDS = (
    "the of and to in is you that it he was for on are as with his they I at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part model token server "
    "inference attention cache prefill decode kernel weights quantized sampling temperature "
    "don't won't it's I'm they're we've isn't O'Neil co-operate e-mail re-run well-known"
).split()
ITALIAN_WORDS = (
    "il la di che è e un una per non con sono mi ti si ma come questo quella più anche perché "
    "città università caffè perciò però già così lunedì venerdì può ciò qualità libertà "
    "all'inizio dell'anno l'uomo un'altra c'è quest'estate sull'isola nell'attesa gli degli "
    "ragazzo bambina finestra scrivania cucina giardino pomeriggio stazione biglietto treno "
    "mangiare bere dormire lavorare studiare parlare capire spiegare andare venire"
).split()
CHINESE_PHRASES = (
    "我们 今天 天气 很好 人工智能 深度学习 模型 推理 服务器 数据 中华人民共和国 北京 上海 "
    "你好 世界 谢谢 请问 这是 一个 测试 注意力 机制 缓存 量化 词元 语言 模型 开源 软件 "
    "龘 龥 鿿 丂 〇 々 〆 ㄅ ㄆ 繁體中文 臺灣 香港 電腦 網路"
).split()
CHINESE_PUNCT = "，。！？；：、“”‘’（）《》【】…—·"
JAPANESE_PHRASES = (
    "こんにちは ありがとう ございます 日本語 東京 カタカナ ひらがな テスト コンピューター "
    "ラーメン を食べた 私は 学生 です 今日は 晴れ ゲーム プログラミング データベース "
    "ｶﾀｶﾅ ﾃｽﾄ ヴ ヶ ゟ ゠ ー ・ 〜 ｡ ｢ ｣"
).split()
OTHER_SCRIPTS = (
    "Привет мир Москва Здравствуйте Ελληνικά γλώσσα Καλημέρα مرحبا بالعالم العربية "
    "שלום עולם नमस्ते दुनिया हिन्दी 안녕하세요 세계 한국어 ภาษาไทย สวัสดี Tiếng Việt "
    "Türkçe İstanbul ğüşıöç Ærøskøbing Straße größer naïve façade résumé Ångström "
    "ﬁ ﬂ Ǆ ǅ ǆ ẞ ß İ ı Ω Å K"
).split()
EMOJI = [
    "😀", "😂", "🥲", "👍", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇮🇹", "🇯🇵", "🇺🇸", "❤️", "✨", "🔥",
    "1️⃣", "#️⃣", "🤖", "🧠", "☕", "🍕", "🚀", "🎉", "🙏🏿", "🧑🏻‍🚀", "😶‍🌫️", "🫠", "🪿", "©", "®", "™",
]
WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "\r\r\n", "\n\r", " \n",
              "\u00a0", "\u3000", "\u2028", "\u2029", "\u000b", "\u000c", "\u2003", "\u200b", "\u202f",
              " \t \n", "    ", "\n    ", "\r\n\r\n", "\t\r\n", "\u0085"]
INVALID_LOOKING = [
    "<｜User", "｜>", "<｜", "｜DSML", "DSML｜", "<｜DSML｜", "</｜DSML｜parameter", "<think", "think>",
    "</think", "<｜Assistant｜", "<|User|>", "<|begin_of_sentence|>", "＜think＞", "<tool_result>",
    "</tool_result>", "&lt;/｜DSML｜parameter>", "&amp;&lt;&gt;&quot;&apos;", "\u0000", "\u0001\u0002",
    "\u007f", "\u0080\u0081\u009f", "\ufffd", "\ufeff", "\u200d", "\u200e\u200f", "\u202e", "\ufffe",
    "\uffff", "\U0010fffd", "\ue000", "\U000f0000", "\u0301", "e\u0301", "\u0301\u0301\u0301",
    "a\u0308\u0304", "\ufe0f", "\U000e0041", "\U0001d400\U0001d401", "\u1d2c", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ｈｅｌｌｏ",
    "１２３４", "٠١٢٣٤٥", "१२३", "²³¹", "½¾", "Ⅻ", "ⅻ", "\\u0041", "\\x00", "%00", "&#x41;",
    "<<>>", "<>", "</>", "<｜｜>", "｜｜", "▁▁", "▁", "Ġ", "Ċ", "ĠĠ",
]
CODE_SNIPPETS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{v:?}\");\n}\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hello\")\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;\n",
    "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"></head>\n<body><p class=\"x\">Hi &amp; bye</p></body></html>\n",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\" | tr a-z A-Z >> out.log 2>&1; done\n",
    "public class Main {\n    public static void main(String[] args) {\n        System.out.println(args.length);\n    }\n}\n",
    "template <typename T>\nstd::vector<T> f(const std::vector<T>& v) { return {v.rbegin(), v.rend()}; }\n",
    "x <- c(1, 2, 3)\nmean(x) %>% print()\n",
    "\\begin{equation}\n  E = mc^2 \\quad \\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}\n\\end{equation}\n",
    "    }\n  }\n}\n\n\n",
    "if (a&&b||!c) { x+=1; y-=2; z*=3; w/=4; } // comment\n/* block */\n",
    "regex = r'^(?P<year>\\d{4})-(?P<month>\\d{2})$'\n",
    "key: value\nlist:\n  - a\n  - b: [1, 2]\n",
    "[section]\nname = \"ds4\"\nversion = \"0.1.0\"\n",
    "diff --git a/x.rs b/x.rs\n@@ -1,3 +1,4 @@\n-old line\n+new line\n",
    "\tindented\twith\ttabs\n\t\tdouble\n",
    "lambda x: x**2 if x>0 else -x  # 注释 コメント\n",
]


def rand_words(rng, words, lo, hi, sep=" "):
    return sep.join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def english(rng):
    s = rand_words(rng, ENGLISH_WORDS, 3, 40)
    s = s[0].upper() + s[1:]
    return s + rng.choice([".", "!", "?", "...", "", ":", ";", " —", "\n"])


def italian(rng):
    s = rand_words(rng, ITALIAN_WORDS, 3, 35)
    return s.capitalize() + rng.choice([".", "!", "?", "…", ", vero?", ""])


def chinese(rng):
    parts = []
    for _ in range(rng.randint(2, 20)):
        parts.append(rng.choice(CHINESE_PHRASES))
        if rng.random() < 0.3:
            parts.append(rng.choice(CHINESE_PUNCT))
        if rng.random() < 0.1:
            parts.append(rng.choice([" ", "AI", "GPU", "2024年", "3.5", "ok"]))
    return "".join(parts)


def japanese(rng):
    parts = [rng.choice(JAPANESE_PHRASES) for _ in range(rng.randint(2, 15))]
    return rng.choice(["", "、", "。", " "]).join(parts) + rng.choice(["。", "！", "？", ""])


def other_scripts(rng):
    return rand_words(rng, OTHER_SCRIPTS, 2, 20)


def code(rng):
    snippets = [rng.choice(CODE_SNIPPETS) for _ in range(rng.randint(1, 3))]
    s = "".join(snippets)
    if rng.random() < 0.3:
        s = s.replace("\n", "\r\n")
    if rng.random() < 0.2:
        s = "```" + rng.choice(["python", "rust", "", "c"]) + "\n" + s + "```"
    return s


def rand_json_value(rng, depth=0):
    kind = rng.randint(0, 7 if depth < 3 else 4)
    if kind == 0:
        return rng.randint(-10**12, 10**12)
    if kind == 1:
        return rng.uniform(-1e6, 1e6)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4):
        pool = ENGLISH_WORDS + CHINESE_PHRASES + EMOJI + ["a\"b", "back\\slash", "<tag>", "&amp;", "\n", "\t"]
        return rand_words(rng, pool, 0, 5)
    if kind in (5, 6):
        return {rng.choice(ENGLISH_WORDS) + str(i): rand_json_value(rng, depth + 1)
                for i in range(rng.randint(0, 5))}
    return [rand_json_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def json_text(rng):
    value = {"id": rng.randint(0, 99999), "data": rand_json_value(rng)}
    indent = rng.choice([None, None, 2, 4, "\t"])
    return json.dumps(value, ensure_ascii=rng.random() < 0.3, indent=indent,
                      separators=None if indent or rng.random() < 0.5 else (",", ":"))


def numbers(rng):
    forms = [
        lambda: str(rng.randint(0, 10**rng.randint(1, 20))),
        lambda: f"{rng.uniform(-1e5, 1e5):.{rng.randint(0, 8)}f}",
        lambda: f"{rng.randint(0, 10**9):,}",
        lambda: f"{rng.uniform(0, 1):.3e}",
        lambda: f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        lambda: f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(0, 99):02d}",
        lambda: f"2026-05-21T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00.{rng.randint(0, 999):03d}Z",
        lambda: f"+39 {rng.randint(300, 399)} {rng.randint(1000000, 9999999)}",
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}",
        lambda: f"0x{rng.getrandbits(rng.choice([8, 16, 32, 64])):x}",
        lambda: f"{rng.randint(1, 999)}%",
        lambda: f"${rng.randint(0, 99999)}.{rng.randint(0, 99):02d}",
        lambda: f"€ {rng.randint(0, 9999)},{rng.randint(0, 99):02d}",
        lambda: f"{rng.randint(10, 99)}°C",
        lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40))),
        lambda: f"{rng.randint(1, 9)}e-{rng.randint(1, 30)}",
        lambda: f"192.168.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
    ]
    return rng.choice([" ", ", ", "\n", "; ", " and ", "、"]).join(
        rng.choice(forms)() for _ in range(rng.randint(1, 8)))


def emoji(rng):
    parts = []
    for _ in range(rng.randint(1, 12)):
        parts.append(rng.choice(EMOJI))
        if rng.random() < 0.4:
            parts.append(rng.choice([" ", "", "ok", " great", "\n", "!!"]))
    return "".join(parts)


def whitespace(rng):
    parts = []
    for _ in range(rng.randint(1, 12)):
        parts.append(rng.choice(WHITESPACE) * rng.randint(1, 4))
        if rng.random() < 0.6:
            parts.append(rng.choice(ENGLISH_WORDS + ["!", ".", "(", "{", "中文", "1", "-"]))
    return "".join(parts)


def crlf(rng):
    lines = [rand_words(rng, ENGLISH_WORDS + ITALIAN_WORDS, 0, 8) for _ in range(rng.randint(2, 8))]
    out = lines[0]
    for line in lines[1:]:
        out += rng.choice(["\n", "\r\n", "\r", "\n\r", "\r\r\n", " \r\n", "\t\n", "\n\n"]) + line
    return out + rng.choice(["", "\n", "\r\n", "\r"])


def random_codepoints(rng):
    ranges = [(0x20, 0x7e), (0xa0, 0x24f), (0x370, 0x3ff), (0x400, 0x4ff), (0x590, 0x6ff),
              (0x900, 0x97f), (0xe00, 0xe7f), (0x1100, 0x11ff), (0x2000, 0x206f), (0x2190, 0x23ff),
              (0x2500, 0x27bf), (0x3000, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3), (0xff00, 0xffef),
              (0x1f300, 0x1f6ff), (0x1d400, 0x1d7ff), (0x0, 0x1f), (0x20000, 0x2a6df)]
    out = []
    for _ in range(rng.randint(1, 30)):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def invalid_looking(rng):
    parts = []
    for _ in range(rng.randint(1, 6)):
        parts.append(rng.choice(INVALID_LOOKING))
        if rng.random() < 0.5:
            parts.append(rng.choice(ENGLISH_WORDS + [" ", "\n", "x"]))
    return "".join(parts)


def mixed(rng, generators):
    return rng.choice(["", " ", "\n", "\n\n"]).join(
        rng.choice(generators)(rng) for _ in range(rng.randint(2, 4)))


def special_in_text(rng, added):
    """Added/special token strings inside ordinary text, adjacent to letters, digits, spaces."""
    parts = []
    for _ in range(rng.randint(1, 5)):
        parts.append(rng.choice([english, chinese, numbers, whitespace, code])(rng)[: rng.randint(0, 60)])
        parts.append(rng.choice(added))
    return "".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/tokenizer/tokenizer.json"))
    parser.add_argument("--out", default=str(ROOT / "tests/fixtures/text/tokenizer_corpus.jsonl"))
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(args.tokenizer)
    with open(args.tokenizer, encoding="utf-8") as f:
        added = [t["content"] for t in json.load(f)["added_tokens"]]

    rng = random.Random(SEED)
    generators = {
        "english": english, "italian": italian, "chinese": chinese, "japanese": japanese,
        "other_scripts": other_scripts, "code": code, "json": json_text, "numbers": numbers,
        "emoji": emoji, "whitespace": whitespace, "crlf": crlf, "codepoints": random_codepoints,
        "invalid_looking": invalid_looking,
    }
    samples = []
    # Every added token alone and inside text, so each one is exercised at least twice.
    for token in added:
        samples.append(("added_alone", token))
        left = rng.choice(["", " ", "x", "Hello ", "中", "1", "\n", "<", "｜"])
        right = rng.choice(["", " ", "y", " world", "文", "2", "\n", ">", "｜"])
        samples.append(("added_in_text", left + token + right))
    per_kind = 320
    for kind, gen in generators.items():
        for _ in range(per_kind):
            samples.append((kind, gen(rng)))
    for _ in range(400):
        samples.append(("mixed", mixed(rng, list(generators.values()))))
    for _ in range(300):
        samples.append(("special_in_text", special_in_text(rng, added)))
    # Edge cases written out by hand.
    for text in ["", " ", "\n", "a", "1234567", "    x", "x    ", "  \n  ", "\r\n\r\n  ", "!!!\n\n",
                 "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>", "｜DSML｜｜DSML｜",
                 "</｜DSML｜parameter>", "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"bash\">\n"]:
        samples.append(("edge", text))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = 0
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for kind, text in samples:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            decoded = tokenizer.decode(ids, skip_special_tokens=False)
            if decoded != text:
                raise SystemExit(f"HF decode does not round-trip {text!r}: {decoded!r}")
            f.write(json.dumps({"kind": kind, "text": text, "ids": ids}, ensure_ascii=False) + "\n")
            n_bytes += len(text.encode("utf-8"))
    print(f"wrote {len(samples)} strings ({n_bytes} text bytes) to {out}")


if __name__ == "__main__":
    main()
