"""The built-in demo task: answer a factual question with one word.

SmolLM2-135M-Instruct knows facts such as capitals, opposites, plurals and chemical symbols, but
when asked to "Answer with one word only." it still replies with a sentence ("The capital of
Kenya is Nairobi."). Each question yields two pairs: chosen is the bare correct answer; rejected
is either that verbose sentence or a wrong one-word answer. The task metric is exact match of the
greedy answer with the one-word reference. Every fifth fact of each kind is held out, so the
validation questions are never trained on.
"""

import re

VERSION = 1  # bump when the generated rows change (it keys the tokenisation cache)
INSTRUCTION = "Answer with one word only."

CAPITALS = """France Paris; Japan Tokyo; Italy Rome; Germany Berlin; Spain Madrid; Egypt Cairo; Kenya Nairobi;
Peru Lima; Canada Ottawa; Australia Canberra; China Beijing; Russia Moscow; Greece Athens; Norway Oslo;
Sweden Stockholm; Finland Helsinki; Denmark Copenhagen; Poland Warsaw; Austria Vienna; Hungary Budapest;
Portugal Lisbon; Ireland Dublin; Thailand Bangkok; Vietnam Hanoi; Cuba Havana; Chile Santiago; Turkey Ankara;
Iran Tehran; Iraq Baghdad; Syria Damascus; Lebanon Beirut; Jordan Amman; Nigeria Abuja; Ghana Accra;
Morocco Rabat; Belgium Brussels; Netherlands Amsterdam; Switzerland Bern; Romania Bucharest; Philippines Manila;
Indonesia Jakarta; Nepal Kathmandu; Afghanistan Kabul; Pakistan Islamabad; Bangladesh Dhaka; Venezuela Caracas;
Uruguay Montevideo; Jamaica Kingston; Iceland Reykjavik; Croatia Zagreb; Serbia Belgrade; Bulgaria Sofia;
Qatar Doha; Senegal Dakar; Zimbabwe Harare; Uganda Kampala; Libya Tripoli; Tunisia Tunis; Algeria Algiers;
Sudan Khartoum; Estonia Tallinn; Latvia Riga; Lithuania Vilnius; Slovakia Bratislava; Armenia Yerevan"""

OPPOSITES = """hot cold; early late; big small; up down; fast slow; happy sad; light dark; open closed; tall short;
rich poor; wet dry; full empty; loud quiet; strong weak; thick thin; push pull; win lose; true false;
always never; inside outside; above below; before after; clean dirty; high low; day night; love hate;
first last; buy sell; left right; north south; east west; black white; good bad; yes no; friend enemy;
question answer; accept reject; increase decrease; maximum minimum; positive negative; ancient modern;
asleep awake; cheap expensive; dangerous safe; deep shallow; wide narrow"""

PLURALS = """mouse mice; box boxes; child children; man men; woman women; tooth teeth; foot feet; goose geese;
person people; leaf leaves; knife knives; wife wives; city cities; baby babies; party parties; ox oxen;
bus buses; fox foxes; church churches; dish dishes; potato potatoes; tomato tomatoes; hero heroes;
sheep sheep; deer deer; dog dogs; cat cats; book books; wolf wolves; half halves; loaf loaves; shelf shelves;
life lives; story stories; lady ladies; key keys; toy toys; match matches; glass glasses; kiss kisses;
louse lice; crisis crises; phenomenon phenomena; criterion criteria"""

SYMBOLS = """gold Au; silver Ag; iron Fe; copper Cu; oxygen O; hydrogen H; carbon C; nitrogen N; sodium Na;
potassium K; helium He; lead Pb; tin Sn; mercury Hg; calcium Ca; zinc Zn; sulfur S; chlorine Cl; neon Ne;
uranium U; magnesium Mg; silicon Si; phosphorus P; fluorine F; lithium Li; nickel Ni; platinum Pt;
tungsten W; iodine I"""

# (facts, question template, verbose-answer template)
KINDS = [
    (CAPITALS, "What is the capital of {x}?", "The capital of {x} is {a}."),
    (OPPOSITES, "What is the opposite of '{x}'?", "The opposite of '{x}' is '{a}'."),
    (PLURALS, "What is the plural of '{x}'?", "The plural of '{x}' is '{a}'."),
    (SYMBOLS, "What is the chemical symbol for {x}?", "The chemical symbol for {x} is {a}."),
]


def _facts(table: str) -> list[tuple[str, str]]:
    return [tuple(item.split()) for item in table.replace("\n", " ").split(";")]


def rows(split: str = "train") -> list[dict]:
    """Conversational preference rows with a ``reference`` answer; ``split`` is ``train`` or ``val``."""
    if split not in ("train", "val"):
        raise ValueError(f"the demo data has splits 'train' and 'val', not {split!r}")
    out = []
    for table, question, verbose in KINDS:
        facts = _facts(table)
        for i, (x, answer) in enumerate(facts):
            if (i % 5 == 4) != (split == "val"):
                continue
            wrong = facts[(i + 7) % len(facts)][1]  # another fact's answer of the same kind
            prompt = [{"role": "user", "content": f"{question.format(x=x)} {INSTRUCTION}"}]
            chosen = [{"role": "assistant", "content": answer}]
            for rejected in (verbose.format(x=x, a=answer), wrong):
                out.append(
                    {
                        "prompt": prompt,
                        "chosen": chosen,
                        "rejected": [{"role": "assistant", "content": rejected}],
                        "reference": answer,
                    }
                )
    return out


def normalize(text: str) -> str:
    """Case-folded text without surrounding white space, quotes and final punctuation."""
    return re.sub(r"^[\s'\"`]+|[\s'\"`.!?,;:]+$", "", text).casefold()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)
