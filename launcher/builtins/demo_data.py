"""Bundled demo data, generated deterministically by this module (pure Python, fixed seeds, no download).

- ``dialogue``: Chinese multi-turn dialogues in ChatGLM format (``prompt``, ``response``, ``history``).
  About half of the final questions ask for a fact the user stated in the first turn, several turns
  earlier ("我的宠物叫什么名字？"), so a longer ``max_source_length`` genuinely helps; the rest are
  answerable from the current turn (arithmetic, capitals, antonyms, repetition, ...).
- ``spo``: SPO triple extraction in the style of ChatGLM fine-tuning's ``data/spo_0.json``, in
  instruction/input/output form: a sentence in, ``subject_predicate_object`` lines out.

``pretraining_corpus`` gives the plain-text dialogues (no prompt template) the built-in tiny model is
pretrained on, so the base knows the language but not the fine-tuning format.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.builtins.cache import build_once
from launcher.builtins.cache import cache_dir as default_cache_dir
from launcher.errors import UserError

DATA_VERSION = 1
"""Bump when generated content changes: the cache directory name includes it."""

BUILTIN_DATA: tuple[str, ...] = ("dialogue", "spo")
SIZES: dict[str, tuple[int, int]] = {"dialogue": (3000, 300), "spo": (2000, 200)}
_SEEDS = {"train": 1, "eval": 2, "pretrain": 3}


def _words(text: str) -> list[str]:
    return text.split()


def _pairs(text: str, sep: str | None = None) -> dict[str, str]:
    """'a:b c:d' -> {'a': 'b', 'c': 'd'}."""
    return dict(pair.split(":", 1) for pair in text.split(sep))


SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈"
)
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚英华玉兰丹宇浩然晨欣怡佳琪子涵博文雨萱轩思鹏飞婷雪梅林峰"
CITIES = _words(
    "北京 上海 广州 深圳 杭州 成都 武汉 南京 西安 重庆 苏州 天津 长沙 郑州 青岛 大连 厦门 昆明 哈尔滨 沈阳 "
    "济南 合肥 福州 南昌 贵阳 兰州 拉萨 海口 宁波 无锡 珠海 桂林 洛阳 扬州"
)
ANIMALS = _words("猫 狗 兔子 仓鼠 鹦鹉 乌龟 金鱼 小猫 小狗")
PET_NAMES = _words(
    "旺财 咪咪 豆豆 花花 球球 小白 小黑 毛毛 团团 圆圆 乐乐 多多 布丁 可乐 雪球 奶茶 芝麻 饺子 汤圆 "
    "果冻 阿黄 大福 年糕 糖糖 皮皮 点点 丸子 馒头 橘子 土豆"
)
JOBS = _words(
    "医生 老师 工程师 程序员 护士 律师 厨师 司机 设计师 会计 记者 警察 画家 作家 "
    "销售员 快递员 农民 科学家 翻译 摄影师"
)
FOODS = _words("火锅 饺子 面条 米饭 包子 烤鸭 寿司 披萨 汉堡 水果 蛋糕 麻辣烫 小龙虾 炒饭 粥 馄饨 烧烤 凉皮")
HOBBIES = _words(
    "跑步 游泳 看书 画画 唱歌 弹钢琴 下棋 爬山 打篮球 踢足球 钓鱼 旅行 写字 拍照 做饭 跳舞 养花 听音乐"
)
CAPITALS = _pairs(
    "中国:北京 日本:东京 法国:巴黎 英国:伦敦 德国:柏林 俄罗斯:莫斯科 意大利:罗马 西班牙:马德里 "
    "美国:华盛顿 "
    "加拿大:渥太华 澳大利亚:堪培拉 韩国:首尔 泰国:曼谷 埃及:开罗 印度:新德里 巴西:巴西利亚 希腊:雅典 "
    "荷兰:阿姆斯特丹 瑞典:斯德哥尔摩 挪威:奥斯陆 芬兰:赫尔辛基 葡萄牙:里斯本 土耳其:安卡拉 越南:河内 "
    "蒙古:乌兰巴托 古巴:哈瓦那 秘鲁:利马 智利:圣地亚哥 波兰:华沙 奥地利:维也纳"
)
FRUIT_COLORS = _pairs(
    "香蕉:黄色 苹果:红色 葡萄:紫色 橙子:橙色 草莓:红色 柠檬:黄色 蓝莓:蓝色 猕猴桃:绿色 桃子:粉色 "
    "樱桃:红色 芒果:黄色 茄子:紫色 黄瓜:绿色 胡萝卜:橙色 西红柿:红色"
)
ANTONYMS = _pairs(
    "大:小 高:矮 长:短 快:慢 冷:热 多:少 上:下 左:右 黑:白 新:旧 远:近 胖:瘦 开心:难过 简单:复杂 "
    "安静:吵闹 干净:肮脏 早:晚 前:后 轻:重 强:弱 真:假 买:卖 宽:窄 深:浅 香:臭"
)
ENGLISH = _pairs(
    "苹果:apple,猫:cat,狗:dog,书:book,水:water,太阳:sun,月亮:moon,学校:school,朋友:friend,老师:teacher,"
    "电脑:computer,音乐:music,花:flower,鱼:fish,房子:house,红色:red,蓝色:blue,谢谢:thank you,"
    "再见:goodbye,早上好:good morning,医生:doctor,城市:city,时间:time,家:home",
    sep=",",
)
SUBJECTS = _words("小猫 老人 孩子们 我的朋友 一只小鸟 那位医生 邻居家的狗 我的妹妹 学生们 一位画家")
PLACES = _words("在公园里 在河边 在图书馆 在山上 在厨房里 在学校门口 在海边 在花园里 在火车上 在操场上")
ACTIONS = _words("看书 散步 唱歌 睡觉 画画 聊天 吃饭 跑步 晒太阳 放风筝 等人 写作业")
CHITCHAT = (
    ("你好呀！", "你好！很高兴和你聊天，有什么可以帮你的吗？"),
    ("你今天过得怎么样？", "我过得很好，谢谢关心！你呢？"),
    ("给我讲个笑话吧。", "好的：小明问爸爸，为什么大海是蓝色的？爸爸说，因为鱼在水里吐泡泡，啵啵啵。"),
    ("最近有点累。", "辛苦了，记得早点休息，多喝水。"),
    ("周末有什么好的安排吗？", "可以去公园散步，或者在家看一本好书。"),
    ("你喜欢什么季节？", "我喜欢秋天，天气凉爽，景色也很美。"),
    ("谢谢你的帮助。", "不客气，很高兴能帮到你！"),
    ("推荐一项运动吧。", "游泳是很好的选择，能锻炼全身。"),
)

# fact key -> (statement phrasings, question phrasings, answer phrasing); {x}: value, {k}: pet kind.
FACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "name": (("我叫{x}。", "我的名字是{x}。"), ("你还记得我叫什么名字吗？", "我叫什么名字？"), "你叫{x}。"),
    "city": (("我住在{x}。", "我家在{x}。"), ("我住在哪个城市？", "你还记得我家在哪里吗？"), "你住在{x}。"),
    "pet": (
        ("我养了一只{k}，它叫{x}。", "我家有一只{k}，名字叫{x}。"),
        ("我的宠物叫什么名字？", "你还记得我的{k}叫什么吗？"),
        "你的{k}叫{x}。",
    ),
    "job": (
        ("我是一名{x}。", "我的工作是{x}。"),
        ("我是做什么工作的？", "你还记得我的职业吗？"),
        "你是一名{x}。",
    ),
    "food": (
        ("我最喜欢吃{x}。", "我特别爱吃{x}。"),
        ("我最喜欢吃什么？", "我最爱吃的是什么？"),
        "你最喜欢吃{x}。",
    ),
    "age": (("我今年{x}岁。", "我已经{x}岁了。"), ("我今年多大了？", "你还记得我几岁吗？"), "你今年{x}岁。"),
    "hobby": (
        ("我平时喜欢{x}。", "我的爱好是{x}。"),
        ("我平时喜欢做什么？", "我的爱好是什么？"),
        "你平时喜欢{x}。",
    ),
}
ACKS = (
    "好的，我记住了。",
    "很高兴认识你！",
    "谢谢你告诉我这些。",
    "明白了，我会记住的。",
    "你好！很高兴认识你。",
)

Turn = tuple[str, str]


def _fact_value(rng: random.Random, key: str) -> str:
    if key == "name":
        return rng.choice(SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2))))
    if key == "age":
        return str(rng.randint(8, 80))
    pools = {"city": CITIES, "pet": PET_NAMES, "job": JOBS, "food": FOODS, "hobby": HOBBIES}
    return rng.choice(pools[key])


def _current_turn_task(rng: random.Random) -> Turn:
    """A question answerable from the current turn alone (or general knowledge)."""
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        op = rng.choice("加减乘")
        if op == "减" and b > a:
            a, b = b, a
        value = a + b if op == "加" else a - b if op == "减" else a * b
        return f"{a}{op}{b}等于多少？", f"{a}{op}{b}等于{value}。"
    if kind == 1:
        country = rng.choice(sorted(CAPITALS))
        return f"{country}的首都是哪里？", f"{country}的首都是{CAPITALS[country]}。"
    if kind == 2:
        fruit = rng.choice(sorted(FRUIT_COLORS))
        return f"{fruit}通常是什么颜色的？", f"{fruit}通常是{FRUIT_COLORS[fruit]}的。"
    if kind == 3:
        word = rng.choice(sorted(ANTONYMS))
        return f"“{word}”的反义词是什么？", f"“{word}”的反义词是“{ANTONYMS[word]}”。"
    if kind == 4:
        word = rng.choice(sorted(ENGLISH))
        return f"“{word}”用英语怎么说？", f"“{word}”用英语说是“{ENGLISH[word]}”。"
    if kind == 5:
        sentence = rng.choice(SUBJECTS) + rng.choice(PLACES) + rng.choice(ACTIONS) + "。"
        return f"请重复这句话：{sentence}", sentence
    return rng.choice(CHITCHAT)


def _dialogue(rng: random.Random) -> dict[str, Any]:
    keys = rng.sample(sorted(FACTS), rng.randint(1, 3))
    kind = rng.choice(ANIMALS)
    values = {key: _fact_value(rng, key) for key in keys}

    def fill(text: str, key: str) -> str:
        return text.replace("{x}", values[key]).replace("{k}", kind)

    statement = "".join(fill(rng.choice(FACTS[key][0]), key) for key in keys)
    history: list[Turn] = [(statement, rng.choice(ACKS))]
    history += [_current_turn_task(rng) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.5:  # the answer needs the fact from the first turn
        key = rng.choice(keys)
        query, response = fill(rng.choice(FACTS[key][1]), key), fill(FACTS[key][2], key)
    else:
        query, response = _current_turn_task(rng)
    return {"prompt": query, "response": response, "history": [list(turn) for turn in history]}


# --- SPO triples ---------------------------------------------------------------------------------

SPO_INSTRUCTION = (
    "你现在是一个信息抽取模型，请从下面的文本中抽取所有的SPO三元组，"
    "三元组内部用“_”连接，三元组之间用换行分隔。"
)
_TITLE_PARTS = _words(
    "星辰 大海 山河 月光 长风 青春 远方 故乡 流年 烟雨 白夜 花开 归途 孤城 梦境 春秋 江湖 雪原"
)
_COMPANY_PARTS = _words("华 星 科 达 信 瑞 新 博 云 海 泰 恒 安 联 创 智")
_SPO_PATTERNS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    (
        "《{book}》是{person}创作的一部小说，于{year}年出版。",
        (("book", "作者", "person"), ("book", "出版年份", "year")),
    ),
    ("《{book}》的作者是{person}。", (("book", "作者", "person"),)),
    ("{person}出生于{city}，是一名{job}。", (("person", "出生地", "city"), ("person", "职业", "job"))),
    (
        "电影《{book}》由{person}执导，{person2}担任主演。",
        (("book", "导演", "person"), ("book", "主演", "person2")),
    ),
    (
        "{company}由{person}创办，总部位于{city}。",
        (("company", "创始人", "person"), ("company", "总部地点", "city")),
    ),
    (
        "歌曲《{book}》的演唱者是{person}，收录在专辑《{book2}》中。",
        (("book", "歌手", "person"), ("book", "所属专辑", "book2")),
    ),
    ("{person}的妻子是{person2}，两人都住在{city}。", (("person", "妻子", "person2"),)),
    (
        "{company}成立于{year}年，创始人是{person}。",
        (("company", "成立时间", "year"), ("company", "创始人", "person")),
    ),
)


def _spo_record(rng: random.Random) -> dict[str, str]:
    def person() -> str:
        return _fact_value(rng, "name")

    slots = {
        "book": "".join(rng.sample(_TITLE_PARTS, 2)),
        "book2": "".join(rng.sample(_TITLE_PARTS, 2)),
        "person": person(),
        "person2": person(),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
        "year": str(rng.randint(1950, 2023)),
        "company": "".join(rng.sample(_COMPANY_PARTS, 2)) + rng.choice(("科技", "集团", "公司")),
    }
    pattern, triples = rng.choice(_SPO_PATTERNS)
    text = pattern
    for slot, value in slots.items():
        text = text.replace("{" + slot + "}", value)
    output = "\n".join(f"{slots[s]}_{p}_{slots[o]}" for s, p, o in triples)
    return {"instruction": SPO_INSTRUCTION, "input": text, "output": output}


# --- public API ----------------------------------------------------------------------------------

_GENERATORS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "dialogue": _dialogue,
    "spo": _spo_record,
}


def generate(name: str, split: str, count: int | None = None) -> list[dict[str, Any]]:
    """The records of one split ('train' or 'eval'); the same arguments always give the same list."""
    if name not in _GENERATORS:
        raise UserError(f"unknown built-in data {name!r}: use one of {', '.join(BUILTIN_DATA)}")
    train_n, eval_n = SIZES[name]
    n = count if count is not None else (train_n if split == "train" else eval_n)
    rng = random.Random(f"{name}-{split}-{_SEEDS[split]}")
    return [_GENERATORS[name](rng) for _ in range(n)]


PRETRAIN_STYLES: tuple[str, ...] = ("sentences", "dialogue")


def pretraining_corpus(
    num_dialogues: int = 3000, *, held_out: bool = False, style: str = "dialogue"
) -> list[str]:
    """Pretraining texts from fresh dialogues (another seed than the train/eval splits) plus SPO sentences.

    ``sentences``: every utterance on its own, shuffled - no question is followed by its answer.
    ``dialogue``: each dialogue as plain lines (question, answer, question, ...), with no prompt
    template and no speaker markers: the base learns to converse, the fine-tuning template is new to it.
    ``held_out`` draws from another seed (for evaluation).
    """
    if style not in PRETRAIN_STYLES:
        raise ValueError(f"unknown pretraining style {style!r}: use one of {', '.join(PRETRAIN_STYLES)}")
    rng = random.Random(f"pretrain-{_SEEDS['pretrain']}" + ("-held-out" if held_out else ""))
    texts: list[str] = []
    for _ in range(num_dialogues):
        record = _dialogue(rng)
        turns = [*record["history"], [record["prompt"], record["response"]]]
        lines = [text for turn in turns for text in turn]
        if style == "dialogue":
            texts.append("\n".join(lines))
        else:
            texts += lines
    texts += [_spo_record(rng)["input"] for _ in range(num_dialogues // 3)]
    rng.shuffle(texts)
    return texts


def ensure_builtin_data(name: str, cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of a built-in data set, written once into the cache (atomically)."""
    if name not in _GENERATORS:
        raise UserError(f"unknown built-in data {name!r}: use one of {', '.join(BUILTIN_DATA)}")
    root = (cache_dir or default_cache_dir()) / f"data-{name}-v{DATA_VERSION}"

    def build(tmp: Path) -> None:
        for split in ("train", "eval"):
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for record in generate(name, split):
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    build_once(root, build)
    return root / "train.jsonl", root / "eval.jsonl"
