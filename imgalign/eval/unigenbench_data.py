"""UniGenBench's tables, kept as data: category spellings, the test-point definitions and the judge prompt.

UniGenBench (Wang et al., arXiv 2508.20751; UniGenBench++ technical report arXiv 2510.18701; CC BY 4.0, (C) 2025
Tencent) ships its prompts as CSVs with a JSON column per prompt (`imgalign.eval.unigenbench`). The public CSVs
spell some sub-themes (``Secondary Categories``) and sentence structures in several ways ("Art-Photography Art" and
"Photography Art", "Logo/icon design" and "Logo/Icon Design"); :data:`SUB_THEME_ALIASES` maps every spelling found
in ``test_prompts_en.csv`` and ``test_prompts_en_long.csv`` (commit 49d0bce) to the 20 sub-themes of the paper.
A spelling not in the table is kept as written and reported by the loader, so a newer CSV still loads.

The judge prompt (:data:`JUDGE_TEMPLATE_EN`) and the test-point definitions (:data:`TESTPOINT_DEFINITIONS_EN`) are
the benchmark's evaluation protocol (UniGenBench ``eval/``): the released evaluation models
(``CodeGoat24/UniGenBench-EvalModel-*``) were trained on exactly this text, so it is reproduced word for word,
its spelling included ("Defination").
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
    "Grammar - Negation": "Tests the model\u2019s understanding of negation grammar",
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
    "                For each image, follow the steps below in order:\n\n"
    "                1. The prompt for the generated image is: \u300c{prompt}\u300d. You are to analyze the image content "
    "in detail from the angles specified in {testpoints}. Detailed definitions of these checkpoints are provided "
    "here: {definitions}. The specific description of each checkpoint in the context of the prompt is: "
    "{descriptions}. You must analyze whether the image meets the requirements for each checkpoint individually.\n\n"
    "                2. Based on the above analysis, determine whether the generated image satisfies each checkpoint "
    "in terms of its visual alignment with the prompt. If the image meets the requirements of a checkpoint, assign a "
    "score of 1 to that checkpoint; otherwise, assign a score of 0.\n\n"
    "                Constraints:\n"
    "                - Only describe content that is directly visible; do not interpret, speculate, or infer any "
    "background story.\n"
    "                - Focus solely on visually verifiable details.\n"
    "                - Omit any uncertain or ambiguous elements.\n"
    "                - Even if mentioned in the input, do not describe abstract entities, emotions, or speculative "
    "ideas.\n\n"
    "                Please strictly follow the output format below:\n\n"
    "                <description>\n"
    "                    <prompt>{prompt}</prompt>\n"
    "                    <checkpoint>{testpoints}</checkpoint>\n"
    "                    <analysis>A list using square brackets `[]`, where each element is a string of detailed "
    "analysis corresponding to one checkpoint, as required in Step 1. **Ensure the list length matches the number "
    "of checkpoints**. Each element should be a string representing the analysis for that specific "
    "checkpoint.</analysis>\n"
    "                    <score>A list using square brackets `[]`, where each element is a binary score (0 or 1) "
    "corresponding to a checkpoint, as required in Step 2. **Ensure the list length matches the number of "
    "checkpoints**. Each element should be either 0 or 1, indicating whether the checkpoint was satisfied.</score>\n"
    "                </description>\n"
)
DEFINITIONS_HEADER_EN = "Checkpoints Defination:\u300c"
DESCRIPTIONS_HEADER_EN = "Checkpoints Description:\u300c"

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
