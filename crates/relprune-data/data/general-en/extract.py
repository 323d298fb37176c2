"""Writes wordnet-examples.txt: 1,000 general-domain English sentences, the usage examples of
WordNet 3.0's glosses (Debian package wordnet-base), for evaluating pruned sentence encoders on
text outside their calibration domain.

    apt-get install wordnet-base && python3 extract.py [/usr/share/wordnet]
"""
import random
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/wordnet"
seen, examples = set(), []
for part in ("noun", "verb", "adj", "adv"):
    with open(f"{root}/data.{part}", encoding="latin-1") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header, or a line without a gloss
            for ex in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                ex = ex.strip()
                if len(ex.split()) >= 6 and ex[0].isalpha() and ex.lower() not in seen:
                    seen.add(ex.lower())
                    examples.append(ex)
random.Random(2026).shuffle(examples)
with open("wordnet-examples.txt", "w", encoding="utf-8") as f:
    f.write("\n".join(examples[:1000]) + "\n")
print(f"{len(examples)} examples, wrote 1000")
