"""UniGenBench's tables, kept as data: category spellings, the test-point definitions and the judge prompt.

UniGenBench (Wang et al., arXiv 2508.20751; UniGenBench++ technical report arXiv 2510.18701; CC BY 4.0, (C) 2025
Tencent) ships its prompts as CSVs with a JSON column per prompt (`imgalign.eval.unigenbench`). The public CSVs
spell some sub-themes (``Secondary Categories``) and sentence structures in several ways ("Art-Photography Art" and
"Photography Art", "Logo/icon design" and "Logo/Icon Design"); :data:`SUB_THEME_ALIASES` maps every spelling found
in ``test_prompts_en.csv`` and ``test_prompts_en_long.csv`` (commit 49d0bce) to the 20 sub-themes of the paper.
A spelling not in the table is kept as written and reported by the loader, so a newer CSV still loads.

The judge prompts (:data:`JUDGE_TEMPLATE_EN`, :data:`JUDGE_TEMPLATE_ZH`) and the test-point definitions
(:data:`TESTPOINT_DEFINITIONS_EN`, :data:`TESTPOINT_DEFINITIONS_ZH`) are the benchmark's evaluation protocol
(UniGenBench ``eval/src/eval_common.py`` at commit 49d0bce), the text the released evaluation models
(``CodeGoat24/UniGenBench-EvalModel-*``) are asked with, reproduced character for character: the spelling
("Defination") and the indentation of the reference's triple-quoted strings (12 spaces in English, 8 in Chinese)
included. The reference's scripts before commit 9d5b7d8 (February 2026) differ in two details: "model’s" (curly
apostrophe) in the Negation definition and "考点说明：「「" as the Chinese definitions header; 49d0bce has "model's" and
"考点说明:「", as here. Chinese files get the Chinese instruction, definitions and category tables
(:data:`JUDGE_PROTOCOLS`); :data:`TESTPOINTS_ZH_TO_EN` names each Chinese test point in English.
"""

from __future__ import annotations

#: theme -> its sub-themes, as named in the paper (5 themes, 20 sub-themes).
SUB_THEMES: dict[str, tuple[str, ...]] = {
    "Art": ("Graphic Art", "Photography Art", "Sculptural Art", "Other"),
    "Film & Story": ("Animation", "Realism", "Sci-Fi"),
    "Illustration": ("Content Illustration", "Copywriting Illustration"),
    "Creative Divergence": ("Imaginative Thinking", "Other"),
    "Design": ("Advertising/E-commerce Design", "Design Assets", "Game Design", "Spatial Design", "Fashion Design",
               "IP Design", "Logo/Icon Design", "Poster Design", "UI Design"),
}

#: (theme, spelling in the CSV) -> canonical sub-theme, for every variant spelling in the public CSVs.
SUB_THEME_ALIASES: dict[tuple[str, str], str] = {
    ("Art", "Art-Graphic Art"): "Graphic Art",
    ("Art", "Art-Photography Art"): "Photography Art",
    ("Art", "Art-Three-dimensional Art"): "Sculptural Art",
    ("Creative Divergence", "Creative divergence-other"): "Other",
    ("Creative Divergence", "Creativity divergence-imagination divergence"): "Imaginative Thinking",
    ("Design", "Design-Game Design"): "Game Design",
    ("Design", "Design-Space Design"): "Spatial Design",
    ("Design", "Logo/icon design"): "Logo/Icon Design",
    ("Illustration", "Mapping-Content Mapping"): "Content Illustration",
}

#: spelling -> canonical sentence structure.
SENTENCE_ALIASES: dict[str, str] = {
    "descriptive sentence pattern": "Descriptive",
    "imperative sentence pattern": "Imperative",
    "描述式句式": "描述式",
    "指令式句式": "指令式",
}

#: keys of the JSON column: the English names, and the Chinese CSVs' names for the same fields.
KEYS_EN = ("Primary Categories", "Secondary Categories", "Subjects", "Sentence Structure", "Testpoints",
           "Testpoint Description")
KEYS_ZH_TO_EN: dict[str, str] = {
    "一级垂类": "Primary Categories",
    "二级垂类": "Secondary Categories",
    "主体": "Subjects",
    "句式": "Sentence Structure",
    "考点": "Testpoints",
    "考点对应描述": "Testpoint Description",
}

#: the 27 sub-dimensions (test points) with the benchmark's definitions (10 primary dimensions: the text before
#: the first "-", or the whole name).
TESTPOINT_DEFINITIONS_EN: dict[str, str] = {
    "Relationship - Comparison": "Comparison of attributes between two entities",
    "Relationship - Composition": "An entity is composed of one or more other entities",
    "Relationship - Inclusion": "A container contains an entity; the container can also be a plane, e.g., a snake "
                                "in a painting on a wall",
    "Relationship - Similarity": "Existence of similarities between different entities",
    "Compound - Imagination": "Things that are impossible in real life",
    "Compound - Feature Matching": "Different entities possess different types of attribute features",
    "Attribute - Size": "Assessment of the subject's size, height, length, thickness, width, or tallness/shortness",
    "Attribute - Expression": "Distinguishing expressions from facial actions; expressions must convey a clear emotion",
    "Attribute - Quantity": "Focuses on the challenge of depicting three or more items accurately",
    "Attribute - Material": "Evaluation of different material types and textures",
    "Attribute - Color": "Assessment of different colors",
    "Attribute - Shape": "Assessment of different shapes",
    "Entity Layout - Two-Dimensional Space": "Arrangement and positioning of entities in two-dimensional space",
    "Entity Layout - Three-Dimensional Space": "Arrangement and positioning of entities in three-dimensional space",
    "Action - Full-body (Character/Anthropomorphic)": "Full-body actions by characters or anthropomorphized entities, "
                                                      "such as running, diving, breakdancing, swinging, or hanging "
                                                      "upside down",
    "Action - Hand (Character/Anthropomorphic)": "Focuses on hand structure\u2014checking if fingers are missing, "
                                                 "broken, or distorted",
    "Action - Animal": "Actions performed by animals",
    "Action - Contact Interaction": "Physical interactions between entities",
    "Action - Non-contact Interaction": "For example, two people making eye contact\u2014testing if the model can "
                                        "accurately depict such interactions",
    "Action - State": "A sustained state of an entity, typically expressed with a verb",
    "Grammar - Negation": "Tests the model's understanding of negation grammar",
    "Grammar - Pronoun Reference": "Tests if the model can resolve ambiguous pronoun references correctly",
    "Grammar - Consistency": "Evaluation of shared attributes among entities",
    "World Knowledge": "Covers knowledge of celebrities, architecture, basic domain knowledge, and internet slang. "
                       "Celebrities with modern copyright risk should be avoided",
    "Style": "Art, painting, photography, design styles, and corresponding artist names",
    "Text Generation": "The text content model needed to accurately generate without any omissions or extra words",
    "Logical Reasoning": "Requires the model to deeply understand the intent and perform reasoning",
}

#: The benchmark's judge instruction. Fields: prompt, testpoints (the Python list repr, as the reference prints
#: it), definitions and descriptions (built by `imgalign.eval.unigenbench.judge_prompt`).
JUDGE_TEMPLATE_EN = (
    "You are a precise and objective English-language image description system. I will provide you with a prompt "
    "for image generation, as well as the corresponding generated image. You will be given a set of evaluation "
    "criteria (checkpoints) and their explanations that define the relevance between the prompt and the image. You "
    "must evaluate whether the generated image fulfills the requirements implied by each checkpoint in the prompt.\n\n"
    "            For each image, follow the steps below in order:\n\n"
    "            1. The prompt for the generated image is: \u300c{prompt}\u300d. You are to analyze the image content "
    "in detail from the angles specified in {testpoints}. Detailed definitions of these checkpoints are provided "
    "here: {definitions}. The specific description of each checkpoint in the context of the prompt is: "
    "{descriptions}. You must analyze whether the image meets the requirements for each checkpoint individually.\n\n"
    "            2. Based on the above analysis, determine whether the generated image satisfies each checkpoint "
    "in terms of its visual alignment with the prompt. If the image meets the requirements of a checkpoint, assign a "
    "score of 1 to that checkpoint; otherwise, assign a score of 0.\n\n"
    "            Constraints:\n"
    "            - Only describe content that is directly visible; do not interpret, speculate, or infer any "
    "background story.\n"
    "            - Focus solely on visually verifiable details.\n"
    "            - Omit any uncertain or ambiguous elements.\n"
    "            - Even if mentioned in the input, do not describe abstract entities, emotions, or speculative "
    "ideas.\n\n"
    "            Please strictly follow the output format below:\n\n"
    "            <description>\n"
    "                <prompt>{prompt}</prompt>\n"
    "                <checkpoint>{testpoints}</checkpoint>\n"
    "                <analysis>A list using square brackets `[]`, where each element is a string of detailed "
    "analysis corresponding to one checkpoint, as required in Step 1. **Ensure the list length matches the number "
    "of checkpoints**. Each element should be a string representing the analysis for that specific "
    "checkpoint.</analysis>\n"
    "                <score>A list using square brackets `[]`, where each element is a binary score (0 or 1) "
    "corresponding to a checkpoint, as required in Step 2. **Ensure the list length matches the number of "
    "checkpoints**. Each element should be either 0 or 1, indicating whether the checkpoint was satisfied.</score>\n"
    "            </description>\n"
    "            "
)
DEFINITIONS_HEADER_EN = "Checkpoints Defination:\u300c"
DESCRIPTIONS_HEADER_EN = "Checkpoints Description:\u300c"

# ---- Chinese files (test_prompts_zh.csv, test_prompts_zh_long.csv) -------------------------------------------------
# The Chinese CSVs name categories and test points in Chinese. Their sub-themes, test points and the judge text below
# are the reference's own (UniGenBench eval/src/eval_common.py@49d0bce, EXPLANATION_DICT_ZH and
# SYSTEM_PROMPT_ZH_TEMPLATE), so a Chinese file is judged exactly as the reference's zh scripts judge it.

#: theme -> its sub-themes in the Chinese files (the same 5 themes and 20 sub-themes as :data:`SUB_THEMES`).
SUB_THEMES_ZH: dict[str, tuple[str, ...]] = {
    "艺术": ("平面艺术", "摄影艺术", "立体艺术", "其他"),
    "影视故事": ("动画", "写实", "科幻"),
    "配图": ("内容配图", "文案配图"),
    "创意发散": ("想象力发散", "其他"),
    "设计": ("广告/电商设计", "设计素材", "游戏设计", "空间设计", "服装设计", "ip设计", "logo/icon设计", "海报设计",
           "软件界面设计"),
}

#: (theme, spelling) -> canonical sub-theme: the "theme-sub-theme" spellings of the public Chinese CSVs.
SUB_THEME_ALIASES_ZH: dict[tuple[str, str], str] = {
    ("艺术", "艺术-平面艺术"): "平面艺术",
    ("艺术", "艺术-摄影艺术"): "摄影艺术",
    ("艺术", "艺术-立体艺术"): "立体艺术",
    ("配图", "配图-内容配图"): "内容配图",
    ("创意发散", "创意发散-想象力发散"): "想象力发散",
    ("创意发散", "创意发散-其他"): "其他",
    ("设计", "设计-游戏设计"): "游戏设计",
    ("设计", "设计-空间设计"): "空间设计",
}

#: the 27 test points of the Chinese files with the reference's Chinese definitions (primary dimension: the text
#: before the first "-", as for English names).
TESTPOINT_DEFINITIONS_ZH: dict[str, str] = {
    "关系-比较关系": "两者的属性对比",
    "关系-构成关系": "一个实体由另一种或几种实体构成",
    "关系-包含关系": "容器对实体的包含关系，容器也可以是平面的，比如：墙上的画里有一只蛇",
    "关系-相似关系": "不同实体中存在的相似关系",
    "复合考点-想象力": "现实生活中不可能发生的事情",
    "复合考点-不同实体特征匹配": "不同实体拥有不同类的属性特征",
    "实体布局-三维空间": "对于三维空间实体的摆放布局",
    "实体布局-二维空间": "对于二维空间实体的摆放布局",
    "属性-大小": "对主体 大小/高低/长短/粗细/宽窄/高矮",
    "属性-表情": "区分表情和脸部动作，脸部动作组成表情，但表情是一定要体现出某种情绪的。",
    "属性-数量": "重点考察三个或三个以上的数字难点",
    "属性-材质": "考察不同材质",
    "属性-颜色": "考察不同颜色",
    "属性-形状": "考察不同形状",
    "动作-人物/拟人全身动作": "人物或拟人全身性的动作，比如奔跑、跳水、跳街舞、荡秋千、倒挂金钩等",
    "动作-人物/拟人手部动作": "针对手部结构的考点，考核手指是否有缺失、崩坏等问题",
    "动作-动物动作": "动物的动作",
    "动作-实体间有接触互动": "各种实体间的有接触互动",
    "动作-实体间无接触互动": "比如两个人对视，考核模型能否把对视关系画对",
    "动作-状态": "实体持续的状态，一般是一个动词。",
    "语法-否定": "考察模型对于否定语法的掌握程度",
    "语法-代词指代": "这里的代词通常是有一些迷惑性的，考察模型能否正确对应",
    "语法-统一性": "实体共同属性的考察",
    "世界知识": "名人、建筑、基础的领域知识、网络流行语。其中名人不要使用当代有版权风险的名人",
    "风格": "艺术、绘画、摄影、设计风格，及对应艺术家名称",
    "逻辑推理": "需要模型深入理解意图并进行一定的推理",
    "文本生成": "考察模型能否准确生成不同语言，字体和长、短文字",
}

#: Chinese test point -> the English test point of the same prompt (checked row by row on the public zh and en
#: CSVs: every index has the same test points in the same order), to put a Chinese run beside an English one.
TESTPOINTS_ZH_TO_EN: dict[str, str] = {
    "关系-比较关系": "Relationship - Comparison",
    "关系-构成关系": "Relationship - Composition",
    "关系-包含关系": "Relationship - Inclusion",
    "关系-相似关系": "Relationship - Similarity",
    "复合考点-想象力": "Compound - Imagination",
    "复合考点-不同实体特征匹配": "Compound - Feature Matching",
    "实体布局-三维空间": "Entity Layout - Three-Dimensional Space",
    "实体布局-二维空间": "Entity Layout - Two-Dimensional Space",
    "属性-大小": "Attribute - Size",
    "属性-表情": "Attribute - Expression",
    "属性-数量": "Attribute - Quantity",
    "属性-材质": "Attribute - Material",
    "属性-颜色": "Attribute - Color",
    "属性-形状": "Attribute - Shape",
    "动作-人物/拟人全身动作": "Action - Full-body (Character/Anthropomorphic)",
    "动作-人物/拟人手部动作": "Action - Hand (Character/Anthropomorphic)",
    "动作-动物动作": "Action - Animal",
    "动作-实体间有接触互动": "Action - Contact Interaction",
    "动作-实体间无接触互动": "Action - Non-contact Interaction",
    "动作-状态": "Action - State",
    "语法-否定": "Grammar - Negation",
    "语法-代词指代": "Grammar - Pronoun Reference",
    "语法-统一性": "Grammar - Consistency",
    "世界知识": "World Knowledge",
    "风格": "Style",
    "逻辑推理": "Logical Reasoning",
    "文本生成": "Text Generation",
}

#: The reference's Chinese judge instruction (same fields as :data:`JUDGE_TEMPLATE_EN`).
JUDGE_TEMPLATE_ZH = (
    "你是一个精确且客观的中文图像描述系统。我会给你一段生成图像的提示词，以及对应的生成图像，同时对于生成图像与提示词之间相关性的"
    "考点及对应说明，你需要逐个考点来判断生成的图像是否遵从了提示词中所包含的对应考点要求。\n\n"
    "        针对每张图像，你需要按照顺序完成如下的任务：\n"
    "        1. 这张生成图像对应的提示词为「{prompt}」，你需要根据{testpoints}中的这些角度逐个对图像内容进行更进一步的详细"
    "分析，考点的详细说明如下：{definitions}，各个考点在这条prompt中对应的描述说明如下：{descriptions}, 你需要根据考点逐一"
    "判断生成图像是否满足了考点对应的要求\n"
    "        2. 综合上述回答，你需要逐个考点判断生成的图像在考点关注维度上是否符合输入的prompt，如果满足要求则该考点得分为1，"
    "否则为0\n\n"
    "        约束条件：\n"
    "        - 仅描述直接可见的内容；不要进行解读、推测或暗示背景故事。\n"
    "        - 专注于能够确定性陈述的视觉细节。\n"
    "        - 省略不确定或不清晰的细节。\n"
    "        - 即使输入中存在，也不要描述抽象实体、情感或推测。\n\n"
    "        请严格遵循以下输出格式：\n\n"
    "        <description>\n"
    "            <prompt>{prompt}</prompt>\n"
    "            <checkpoint>{testpoints}</checkpoint>\n"
    "            <analysis>按照步骤1对于给定考点进行逐项详细分析，格式为一个方括号列表，**确保列表的长度与考点的数量相等**，"
    "每个元素为一个字符串，表示对于对应考点的分析</analysis>\n"
    "            <score>按照步骤2逐个对考点进行打分，格式为一个方括号列表，**确保列表的长度与考点的数量相等**，每个元素为0或者1，"
    "表示对应考点是否完成</score>\n"
    "        </description>\n"
    "        "
)
DEFINITIONS_HEADER_ZH = "考点说明:\u300c"
DESCRIPTIONS_HEADER_ZH = "考点描述说明:\u300c"

#: language -> (judge template, test point definitions, definitions header, descriptions header).
JUDGE_PROTOCOLS: dict[str, tuple[str, dict[str, str], str, str]] = {
    "en": (JUDGE_TEMPLATE_EN, TESTPOINT_DEFINITIONS_EN, DEFINITIONS_HEADER_EN, DESCRIPTIONS_HEADER_EN),
    "zh": (JUDGE_TEMPLATE_ZH, TESTPOINT_DEFINITIONS_ZH, DEFINITIONS_HEADER_ZH, DESCRIPTIONS_HEADER_ZH),
}

#: The toy UniGenBench (scripts/bench_unigenbench.py): toy evaluator criterion -> test point, and the toy-only
#: "Background" test point's definition. A test point scores 1 when its criterion is fully met (1.0).
TOY_TESTPOINTS: dict[str, str] = {
    "presence": "Compound - Feature Matching",
    "colour": "Attribute - Color",
    "shape": "Attribute - Shape",
    "count": "Attribute - Quantity",
    "size": "Attribute - Size",
    "relation": "Entity Layout - Two-Dimensional Space",
    "background": "Background",
}
TOY_DEFINITIONS: dict[str, str] = {"Background": "The background colour of the image"}
