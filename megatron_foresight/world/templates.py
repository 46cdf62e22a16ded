"""The built-in world's phrasings: of each fact in the corpus, and of each 1-hop and 2-hop
question. The knowledge base, the tasks and the `builtin` text corpus all read them here."""

# Several phrasings per fact, so retrieval and a language model see varied text.
FACTS = {
    "region": ("{name} is a city in the region of {region}.", "{name} lies in {region}.",
               "The city of {name} belongs to the region of {region}."),
    "founded": ("{name} was founded in {founded}.", "The founding of {name} dates to {founded}."),
    "population": ("About {population} people live in {name}.",
                   "{name} has a population of about {population}."),
    "trade": ("The people of {name} trade in {trade}.", "{name} is known for its {trade}."),
    "road_to": ("From {name} the main road leads to {road_to}.",),
    "born_in": ("{name} was born in {born_in}.", "{name} comes from the city of {born_in}."),
    "profession": ("{name} works as a {profession}.", "By profession {name} is a {profession}."),
    "born": ("{name} was born in the year {born}.",),
    "seat": ("The {name} has its seat in {seat}.", "The {name} is based in {seat}."),
    "founder": ("The {name} was founded by {founder}.", "{founder} founded the {name}."),
    "craft": ("The {name} makes {craft}.", "Members of the {name} craft {craft}."),
}

# (kind, attribute): phrasings of the question for that attribute of an entity of that kind.
ONE_HOP = {
    ("city", "region"): ("In which region is {name}?", "Which region is the city of {name} in?"),
    ("city", "founded"): ("In what year was {name} founded?", "When was {name} founded?"),
    ("city", "trade"): ("What does {name} trade in?", "What is {name} known for trading?"),
    ("person", "born_in"): ("In which city was {name} born?", "Where does {name} come from?"),
    ("person", "profession"): ("What is the profession of {name}?", "What does {name} work as?"),
    ("guild", "seat"): ("Where does the {name} have its seat?", "In which city is the {name}?"),
    ("guild", "founder"): ("Who founded the {name}?",),
    ("guild", "craft"): ("What does the {name} make?",),
}
# (kind, bridge attribute, attribute of the bridge entity): the question.
TWO_HOP = {
    ("person", "born_in", "region"): "In which region was {name} born?",
    ("person", "born_in", "trade"): "What does the city where {name} was born trade in?",
    ("guild", "seat", "founded"): "In what year was the city that hosts the {name} founded?",
    ("guild", "seat", "region"): "In which region does the {name} have its seat?",
    ("guild", "founder", "profession"): "What is the profession of the founder of the {name}?",
    ("guild", "founder", "born_in"): "In which city was the founder of the {name} born?",
}
