# A template file in the shape of the reference's `dataloaders/qa_template.py` (READ / SESAME), written for
# the tests with our own sentences. `read_jax.data.templates.load_reference_templates` reads it as data.
from model.llava.constants import DEFAULT_IMAGE_TOKEN

SHORT_QUESTION_TEMPLATE = [
    DEFAULT_IMAGE_TOKEN + "\n" + "Fixture question one: is {class_name} shown? Segment it if so.",
    DEFAULT_IMAGE_TOKEN + "\n" + "Fixture question two: mask {class_name}, or say it is absent.",
    DEFAULT_IMAGE_TOKEN
    + "\n"
    + "Fixture question three: look for {class_name} in the picture and outline it if it is there.",
]

LONG_QUESTION_TEMPLATE = [
    DEFAULT_IMAGE_TOKEN + "\n" + "{sent} Fixture long question: segment what this describes.",
    DEFAULT_IMAGE_TOKEN + "\n" + "{sent} Fixture long question: give its mask if present.",
]

NEG_ANSWER_TEMPLATE = [
    "Fixture denial: no {class_name} here.",
    "Fixture denial: nothing like that in the image.",
]

LONG_ANSWER_TEMPLATE = [
    "Fixture long answer: [SEG].",
]

SHORT_ANSWER_TEMPLATE = [
    "Fixture answer: {class_name} is [SEG].",
    "Fixture answer: here, [SEG].",
]

CORRECT_ANSWER_TEMPLATE = [
    "Fixture correction: not {class_name}, but {gt_name}.",
]

EXPLANATORY_QUESTION_TEMPLATE = [
    "Fixture: explain why.",
]
