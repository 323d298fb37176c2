#!/usr/bin/env python3
"""Writes sacrebleu_vectors.json: corpus-BLEU test vectors computed by sacreBLEU itself.

relprune_eval::bleu claims to compute corpus BLEU exactly as sacreBLEU does; this script records
what sacreBLEU says on a set of chosen corner cases, and tests/bleu_sacrebleu.rs checks the Rust
implementation against every one of them. Regenerate (from the repository root) with:

    python3 -m venv /tmp/sacrebleu-venv
    /tmp/sacrebleu-venv/bin/pip install sacrebleu==2.6.0
    /tmp/sacrebleu-venv/bin/python crates/relprune-eval/tests/data/gen_sacrebleu_vectors.py

The output is deterministic (fixed seeds), so regenerating with the same sacreBLEU gives the same
file. The version is pinned: the Rust side puts it into the signature
(`relprune_eval::bleu::SACREBLEU_VERSION`), so a different sacreBLEU would change every signature;
pass --any-version to write vectors from another version anyway (then update the constant and
check what else changed).

Each case holds the inputs (`hyps`, and `refs` as reference *streams*, sacreBLEU's layout:
refs[stream][segment]), the options, and either sacreBLEU's result (`expected`) or the exception
it raised (`error`). `formatted` is `str(score)` (width 2, no signature); `cli_text` is what
`sacrebleu REF -i HYP -f text` prints (width 1, with the signature).

`tokenizer_13a` holds (input, output) pairs of sacreBLEU's 13a tokenizer on fixed and seeded
random strings, to pin down the regular expressions character by character.
"""

import json
import random
import sys
from pathlib import Path

import sacrebleu
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

PINNED_VERSION = "2.6.0"
OUT = Path(__file__).resolve().parent / "sacrebleu_vectors.json"


def case(name, hyps, refs, tokenize="13a", smooth_method="exp", smooth_value=None,
         lowercase=False, effective_order=False):
    """Runs sacreBLEU's corpus_score on one case and returns the JSON record."""
    options = {
        "tokenize": tokenize,
        "smooth_method": smooth_method,
        "smooth_value": smooth_value,
        "lowercase": lowercase,
        "effective_order": effective_order,
    }
    record = {"name": name, "hyps": hyps, "refs": refs, "options": options}
    bleu = BLEU(tokenize=tokenize, smooth_method=smooth_method, smooth_value=smooth_value,
                lowercase=lowercase, effective_order=effective_order)
    try:
        score = bleu.corpus_score(hyps, refs)
    except Exception as e:  # recorded: the Rust side must refuse these inputs too
        record["error"] = f"{type(e).__name__}: {e}"
        return record
    sig = str(bleu.get_signature())
    record["expected"] = {
        "score": score.score,
        "counts": list(score.counts),
        "totals": list(score.totals),
        "precisions": list(score.precisions),
        "bp": score.bp,
        "ratio": score.ratio,
        "sys_len": score.sys_len,
        "ref_len": score.ref_len,
        "signature": sig,
        "formatted": str(score),
        "cli_text": score.format(width=1, signature=sig),
    }
    return record


BASIC_HYPS = [
    "The cat is on the mat.",
    "There is a cat on the mat, it seems.",
    "Hello world!",
    "It is a guide to action which ensures that the military always obeys the commands of the party.",
]
BASIC_REFS = [
    "The cat sat on the mat.",
    "A cat is on the mat, it seems to me.",
    "Hello, world!",
    "It is a guide to action that ensures that the military will forever heed Party commands.",
]
BASIC_REFS_B = [
    "There is a cat on the mat.",
    "The cat seems to be on the mat.",
    "Hello world !",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party.",
]
BASIC_REFS_C = [
    "On the mat sat the cat.",
    "It seems a cat is on the mat.",
    "Hi, world.",
    "It is the practical guide for the army always to heed the directions of the party.",
]


def random_corpus(seed, n, n_refs):
    """A seeded synthetic corpus: references from a small vocabulary, hypotheses perturbed."""
    rng = random.Random(seed)
    vocab = ("the a of to in and is was it for on with as by at from that this be are "
             "house river 2,000 3.5 U.S. e.g. (see) \"quoted\" don't well-known ; : ! ? -- ...").split()
    refs = [[] for _ in range(n_refs)]
    hyps = []
    for _ in range(n):
        base = [rng.choice(vocab) for _ in range(rng.randint(0, 18))]
        for r in range(n_refs):
            words = list(base)
            for _ in range(rng.randint(0, 4)):
                if words and rng.random() < 0.5:
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                else:
                    words.insert(rng.randint(0, len(words)), rng.choice(vocab))
            refs[r].append(" ".join(words))
        words = list(base)
        for _ in range(rng.randint(0, 6)):
            op = rng.random()
            if words and op < 0.3:
                del words[rng.randrange(len(words))]
            elif words and op < 0.6:
                words[rng.randrange(len(words))] = rng.choice(vocab)
            else:
                words.insert(rng.randint(0, len(words)), rng.choice(vocab))
        hyps.append(" ".join(words))
    return hyps, refs


def cases():
    c = []
    c.append(case("basic_single_ref", BASIC_HYPS, [BASIC_REFS]))
    c.append(case("identical", BASIC_REFS, [BASIC_REFS]))
    c.append(case("multi_ref_2", BASIC_HYPS, [BASIC_REFS, BASIC_REFS_B]))
    c.append(case("multi_ref_3", BASIC_HYPS, [BASIC_REFS, BASIC_REFS_B, BASIC_REFS_C]))
    # Hypothesis of 5 tokens, references of 4 and 6: the tie goes to the shorter one (4), in
    # either stream order.
    c.append(case("closest_ref_len_tie", ["a b c d e", "a b c d e"],
                  [["a b c d", "a b c d e f"], ["a b c d e f", "a b c d"]]))
    c.append(case("tok_none", BASIC_HYPS, [BASIC_REFS], tokenize="none"))
    c.append(case("tok_none_multi_ref", BASIC_HYPS, [BASIC_REFS, BASIC_REFS_B], tokenize="none"))
    zero34_h = ["alpha beta gamma delta", "one two three four five"]
    zero34_r = ["alpha beta x gamma delta", "one two x three four x five"]
    zero4_h = ["alpha beta gamma delta epsilon", "one two three four five"]
    zero4_r = ["alpha beta gamma x delta epsilon", "one two three x four five"]
    for smooth, value in [("exp", None), ("none", None), ("floor", None), ("floor", 0.5),
                          ("add-k", None), ("add-k", 0.5)]:
        tag = smooth.replace("-", "") + ("" if value is None else f"_{value}")
        c.append(case(f"zero_order3_4_{tag}", zero34_h, [zero34_r], smooth_method=smooth,
                      smooth_value=value))
    c.append(case("zero_order4_exp", zero4_h, [zero4_r]))
    c.append(case("zero_order4_none", zero4_h, [zero4_r], smooth_method="none"))
    c.append(case("basic_floor", BASIC_HYPS, [BASIC_REFS], smooth_method="floor"))
    c.append(case("basic_addk", BASIC_HYPS, [BASIC_REFS], smooth_method="add-k"))
    c.append(case("basic_none", BASIC_HYPS, [BASIC_REFS], smooth_method="none"))
    c.append(case("no_match_at_all", ["foo bar baz", "qux"], [["one two three", "four five"]]))
    c.append(case("no_match_at_all_floor", ["foo bar baz", "qux"], [["one two three", "four five"]],
                  smooth_method="floor"))
    # Only one- and two-token hypotheses: no 3- or 4-grams at all (totals 0). Without effective
    # order the score is 0; with it, the geometric mean is over orders 1-2 only.
    short_h = ["Hello", "good morning", "thanks"]
    short_r = ["Hello", "good morning", "thank you"]
    c.append(case("short_segments", short_h, [short_r]))
    c.append(case("short_segments_eff", short_h, [short_r], effective_order=True))
    c.append(case("short_segments_eff_none", short_h, [short_r], smooth_method="none",
                  effective_order=True))
    c.append(case("basic_eff", BASIC_HYPS, [BASIC_REFS], effective_order=True))
    c.append(case("single_token_exact", ["Hello"], [["Hello"]]))
    case_h = ["The CAT sat on THE Mat.", "ΟΔΟΣ ΣΟΦΟΣ", "STRASSE und Straße ẞ", "İstanbul ist GROSS"]
    case_r = ["the cat sat on the mat.", "οδος σοφος", "strasse und straße ß", "i̇stanbul ist gross"]
    c.append(case("lowercase", case_h, [case_r], lowercase=True))
    c.append(case("mixed_case_no_lowercase", case_h, [case_r]))
    c.append(case("unicode_german",
                  ["Die Brücke über den Fluß ist schön, aber älter.", "Größe: 5,5 Meter; Übermaß!"],
                  [["Die Brücke über dem Fluss ist schön, aber sehr alt.", "Größe: 5,5 m; Übermaß!"]]))
    c.append(case("unicode_cjk",
                  ["我喜欢吃苹果。", "今日は いい 天気 ですね！", "서울은 한국의 수도입니다.", "我 喜欢 吃 苹果 。"],
                  [["我喜欢吃苹果。", "今日は いい 天気 ですね。", "서울은 한국의 수도이다.", "我 喜欢 吃 香蕉 。"]]))
    c.append(case("unicode_emoji",
                  ["I love pizza 🍕🍕 and 🎉!", "👍🏽 thumbs up, 🇩🇪 flag", "café naïve résumé"],
                  [["I love pizza 🍕 and 🎉 !", "👍🏽 thumbs up 🇩🇪 flag", "cafe naive resume"]]))
    c.append(case("punctuation_heavy",
                  ["\"Quoted,\" he said -- (really?) [yes]; {no}: <ok> & so on...",
                   "It's a well-known fact: e.g., U.S.A. isn't U.K.!",
                   "&quot;HTML&quot; &amp; &lt;tags&gt; <skipped> here",
                   "a/b\\c|d~e^f_g`h@i#j$k%l*m+n=o"],
                  [["\"Quoted\", he said - (really?) [yes]; {no} : <ok> and so on ...",
                    "It is a well known fact: e.g. U.S.A. is not U.K.!",
                    "\"HTML\" & <tags> here",
                    "a/b\\c|d~e^f_g`h@i#j$k%l*m+n=o"]]))
    c.append(case("numbers",
                  ["It costs 1,000.50 dollars, i.e. 3.14 times 10-20 units.",
                   "Pages 5-7, 12 - 14 and 2.5. Then 7,5% and 1.000,00 EUR.",
                   "Version 2.6.0, released 2024-01-05 at 10:30."],
                  [["It costs 1,000.50 dollars, i.e. 3.14 times 10 - 20 units.",
                    "Pages 5-7, 12-14 and 2.5. Then 7.5% and 1.000,00 EUR.",
                    "Version 2.6.0 was released on 2024-01-05 at 10:30."]]))
    c.append(case("empty_hyp_lines", ["", "The cat sat on the mat.", "", "Hello world"],
                  [["Nothing here", "The cat sat on the mat.", "Empty", "Hello, world"]]))
    c.append(case("empty_ref_lines", ["Something", "The cat sat on the mat.", "extra words here"],
                  [["", "The cat sat on the mat.", ""]]))
    c.append(case("empty_ref_line_in_one_stream", BASIC_HYPS,
                  [BASIC_REFS, ["", "", BASIC_REFS_B[2], ""]]))
    c.append(case("all_empty", ["", "", ""], [["", "", ""]]))
    c.append(case("all_empty_two_refs", [""], [[""], [""]]))
    c.append(case("all_hyps_empty", ["", ""], [["The cat sat on the mat.", "Hello"]]))
    c.append(case("hyp_longer", ["the cat sat on the mat today in the warm afternoon sun",
                                 "hello there my dear old world"],
                  [["the cat sat on the mat", "hello world"]]))
    c.append(case("hyp_shorter", ["the cat sat", "hello"],
                  [["the cat sat on the mat today", "hello there my dear world"]]))
    c.append(case("whitespace",
                  ["  The  cat\tsat on\u00a0the mat.  \r", "Hello\u3000world\u2009!\x1cend",
                   "trailing\x1f", "\t"],
                  [["The cat sat on the mat.", "Hello world ! end", "trailing", ""]]))
    c.append(case("whitespace_tok_none",
                  ["  The  cat\tsat on\u00a0the mat.  \r", "Hello\u3000world\u2009!\x1cend",
                   "trailing\x1f", "\t"],
                  [["The cat sat on the mat.", "Hello world ! end", "trailing", ""]],
                  tokenize="none"))
    c.append(case("newline_inside_segment", ["a well-\nknown fact\nabout cats"],
                  [["a wellknown fact about cats"]]))
    hyps, refs = random_corpus(1234, 60, 2)
    c.append(case("random_corpus_2refs", hyps, refs))
    c.append(case("random_corpus_2refs_lc_none_floor", hyps, refs, tokenize="none",
                  smooth_method="floor", lowercase=True))
    hyps, refs = random_corpus(99, 40, 1)
    c.append(case("random_corpus_1ref_addk", hyps, refs, smooth_method="add-k", smooth_value=2))
    # sacreBLEU refuses an empty corpus (it indexes hyps[0]); so must we.
    c.append(case("zero_segments", [], [[]]))
    return c


def tokenizer_vectors():
    """13a tokenizer inputs and outputs: fixed corner cases plus seeded random strings."""
    fixed = [
        "", " ", "a", "a.", "a..", "...", "1.", ".1", "1.2", "a.1", "1.a", "1,000.5", ",,", "a,b",
        "1-2", "1--2", "a-b", "-1", "1-", "3.-4", "x&y", "&amp;", "&amp;quot;", "&quot;&lt;&gt;",
        "<skipped>", "a<skipped>b", "well-\nknown", "line\nbreak", "U.S.A.", "e.g.,", "it's",
        "'quote'", "\"dq\"", "(a)[b]{c}", "~`!@#$%^&*()_+=|\\:;<>?/", "٣.٤", "１.２", "x.\u00a0y",
        "ende.\x1c", "Ünïcödé, ok.", "🙂.🙂", "a\tb\nc", "  lots   of   space  ",
    ]
    rng = random.Random(20240607)
    alphabet = list("ab19 .,-&;'\"()[]{}<>|~`^_@:/\\\t\n") + ["&amp;", "&quot;", "<skipped>", "é",
                                                               "٣", "中", "\u00a0", "\x1d"]
    rand = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(120)]
    tok = Tokenizer13a()
    return [{"input": s, "output": tok(s)} for s in fixed + rand]


def main():
    if sacrebleu.__version__ != PINNED_VERSION and "--any-version" not in sys.argv[1:]:
        sys.exit(f"sacreBLEU {sacrebleu.__version__} found, the vectors are pinned to "
                 f"{PINNED_VERSION} (pass --any-version to write them anyway)")
    data = {
        "generator": "crates/relprune-eval/tests/data/gen_sacrebleu_vectors.py",
        "sacrebleu_version": sacrebleu.__version__,
        "python_version": sys.version.split()[0],
        "cases": cases(),
        "tokenizer_13a": tokenizer_vectors(),
    }
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    n_err = sum("error" in c for c in data["cases"])
    print(f"wrote {OUT}: {len(data['cases'])} cases ({n_err} expecting an error), "
          f"{len(data['tokenizer_13a'])} tokenizer strings")


if __name__ == "__main__":
    main()
