"""Generate the shipped sample dataset in ``sample_data/``.

bulkinfer ships a small set of prompts so that ``bulkinfer run jobs/sample.yaml`` works out of
the box and so that batching, length sorting and checkpointing can be exercised on input that
looks like real traffic to a small chat assistant: mostly short questions, some medium requests
with pasted context (emails, product blurbs, code), and a few long documents to summarize.

The prompts are written by hand; the script only combines and shuffles them, always with fixed
seeds, so running it twice produces a byte-identical ``prompts.jsonl``. It writes:

* ``sample_data/prompts.jsonl``   - one ``{"id", "prompt", "source"}`` object per line, UTF-8
* ``sample_data/prompts.parquet`` - the same rows and columns, all strings
* ``sample_data/quick.jsonl``     - the shortest few prompts of each source, in file order
  (the default sample job; ``jobs/sample_large.yaml`` runs all of them)

Run it from anywhere with ``python scripts/make_sample_data.py``.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT_DIR = Path(__file__).resolve().parent.parent / "sample_data"
JSONL_PATH = OUT_DIR / "prompts.jsonl"
PARQUET_PATH = OUT_DIR / "prompts.parquet"
QUICK_PATH = OUT_DIR / "quick.jsonl"

SHUFFLE_SEED = 1234
LONG_SEED = 20240611
N_LONG = 45
TEMPLATES_PER_SNIPPET = 3

# Word-count bounds (inclusive) for each length class, checked before anything is written.
SHORT_MAX_WORDS = 29
MEDIUM_WORDS = (40, 200)
LONG_WORDS = (400, 900)
PARAGRAPH_WORDS = (60, 110)
LONG_PARAGRAPHS_PER_DOC = (5, 9)
MAX_JSONL_BYTES = 1_500_000
# The quick sample (jobs/sample.yaml): the shortest few prompts of every source, so the first
# run shows every kind of request and answers in about a minute on two CPU cores.
QUICK_PER_SOURCE = 4
QUICK_MAX_CHARS = 600

COLUMNS = ("id", "prompt", "source")

# ---------------------------------------------------------------------------------------------
# Short prompts (under 30 words), grouped by source.
# ---------------------------------------------------------------------------------------------

TRIVIA = [
    "What is the capital of Australia?",
    "Who wrote the novel One Hundred Years of Solitude?",
    "How many bones are in the adult human body?",
    "What year did the Berlin Wall fall?",
    "Which planet has the most moons?",
    "What is the tallest mountain in Africa?",
    "Who painted the ceiling of the Sistine Chapel?",
    "What is the chemical symbol for tungsten?",
    "How long does light from the Sun take to reach Earth?",
    "Which country has the longest coastline in the world?",
    "What language do people speak in Brazil?",
    "When was the first iPhone released?",
    "What is the largest organ of the human body?",
    "Who was the first woman to win a Nobel Prize?",
    "At what temperature does water boil at the top of Mount Everest?",
    "Which ocean is the deepest?",
    "How many players are on a rugby union team?",
    "What does DNA stand for?",
    "What is the smallest country in the world by area?",
    "Who discovered penicillin, and in what year?",
    "What is the currency of Switzerland?",
    "Which river flows through Budapest?",
    "How many hearts does an octopus have?",
    "What was the name of the ship that carried the Pilgrims to America in 1620?",
    "Is a tomato a fruit or a vegetable?",
    "What is the speed of sound in air at room temperature?",
    "Who composed The Four Seasons?",
    "What is the hardest natural material on Earth?",
    "Which gas makes up most of the Earth's atmosphere?",
    "Roughly how many people live in Tokyo compared with New York City?",
    "Who is the author of the Harry Potter books?",
    "What is the longest bone in the human body?",
    "In which countries are the Atacama and the Gobi deserts?",
    "Why is the Dead Sea called dead?",
    "Quelle est la capitale du Canada ?",
    "¿Cuántos planetas hay en el sistema solar?",
    "Wer hat die Relativitätstheorie entwickelt?",
    "长城有多长？",
    "富士山の高さは何メートルですか？",
    "Who was Gabriel García Márquez and what is he best known for?",
]

HOW_TO = [
    "How do I boil an egg so the yolk stays a little soft?",
    "How can I remove a red wine stain from a cotton shirt?",
    "How do I fix a flat tire on a bicycle?",
    "What's the easiest way to undo my last git commit without losing the changes?",
    "How do I make a sourdough starter from scratch?",
    "How do I reset my Wi-Fi router to factory settings?",
    "How do you tie a bowline knot?",
    "How can I take a screenshot of just one window on a Mac?",
    "How do I unclog a bathroom sink without using chemicals?",
    "How should I store fresh basil so it doesn't wilt?",
    "How do I freeze the top row in Google Sheets?",
    "How do I write a cover letter for my first job?",
    "What's the best way to clean a cast iron pan?",
    "How do I set up two-factor authentication on my email account?",
    "How can I get my toddler to fall asleep faster?",
    "How do I convert a Word document to PDF?",
    "How do I jump-start a car with a dead battery?",
    "How do you repot a snake plant?",
    "How do I find the IP address of my computer on Windows?",
    "How do I ask my landlord to fix a leaking faucet?",
    "Comment faire une pâte à crêpes sans grumeaux ?",
    "¿Cómo puedo mejorar mi pronunciación en inglés? 🙂",
]

EXPLAIN = [
    "Explain how vaccines train the immune system, in simple terms.",
    "What is inflation and why does it happen?",
    "Explain the difference between weather and climate.",
    "Why is the sky blue?",
    "What is a black hole?",
    "Can you explain what an API is to someone who doesn't code?",
    "What is the difference between a virus and a bacterium?",
    "Explain compound interest with a simple example.",
    "Why do we have leap years?",
    "What causes the seasons on Earth?",
    "How does a refrigerator keep things cold?",
    "Explain what a neural network is in two sentences.",
    "What's the difference between RAM and storage?",
    "Why do onions make you cry when you cut them?",
    "What is photosynthesis?",
    "Explain the rules for castling in chess.",
    "What does it mean when a company goes public?",
    "How do noise-cancelling headphones work?",
    "What is the difference between HTTP and HTTPS?",
    "Why does ice float on water?",
    "Erklär mir bitte kurz, wie eine Wärmepumpe funktioniert.",
    "What is the greenhouse effect, and is it always a bad thing?",
]

MATH = [
    "What is 17 times 24?",
    "If a train travels 180 km in 2.5 hours, what is its average speed?",
    "What is 15% of 240?",
    "A shirt costs $40 and is on sale for 25% off. What is the sale price?",
    "Solve for x: 3x + 7 = 22.",
    "What is the square root of 196?",
    "I have 3 apples and buy two bags of 6. How many apples do I have now?",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "What is the area of a circle with a radius of 5 cm?",
    "If I save $150 a month, how many months until I have $2,000?",
    "How many minutes are there in a week?",
    "What is 2 to the power of 10?",
    "A recipe for 4 people needs 300 g of flour. How much do I need for 6 people?",
    "Is 91 a prime number?",
    "What's the average of 12, 18, 25 and 33?",
    "Three friends split an $87 dinner bill plus a 15% tip equally. How much does each person pay?",
    "What is the sum of the interior angles of a hexagon?",
    "Simplify the fraction 84/126.",
    "If a car uses 6.5 liters per 100 km, how much fuel does it need for 340 km?",
    "What is 0.125 written as a fraction?",
]

CODE = [
    "How do I reverse a list in Python?",
    "What is the difference between let and const in JavaScript?",
    "Write a SQL query that counts the rows in a table called orders.",
    "How do I read a CSV file with pandas?",
    "What does the -r flag do in the cp command?",
    "How can I check which version of Python is installed?",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is a segmentation fault?",
    "How do I center a div horizontally and vertically with CSS?",
    "What's the difference between a list and a tuple in Python?",
    "How do I make an HTTP GET request in Go?",
    "Write a regular expression that matches a US ZIP code.",
    "What does `git rebase` actually do?",
    "How do I merge two dictionaries in Python 3?",
    "Why does 0.1 + 0.2 not equal 0.3 in most programming languages?",
]

CREATIVE = [
    "Write a haiku about a rainy Monday morning.",
    "Give me five name ideas for a small neighborhood bakery.",
    "Write a two-line poem about a cat who hates Mondays.",
    "Suggest a title for a mystery novel set in a lighthouse.",
    "Write a short birthday message for my grandmother, who is turning 90.",
    "Tell me a joke about programmers.",
    "Write a limerick about a forgetful wizard.",
    "Give me three ideas for a team-building activity for ten people.",
    "Describe a sunset over the ocean in one sentence.",
    "Come up with a slogan for a reusable water bottle brand.",
    "Write the opening line of a fantasy story.",
    "Invent a new holiday and describe how people celebrate it.",
    "Write a short toast for my best friend's wedding.",
    "Écris un petit poème sur la mer en quatre vers.",
]

ADVICE = [
    "What should I pack for a three-day hiking trip?",
    "How can I stop procrastinating when I work from home?",
    "What are some good questions to ask at the end of a job interview?",
    "I'm nervous about public speaking. Any tips?",
    "Should I pay off my student loans or start investing first?",
    "What are some healthy snacks I can bring to work?",
    "How do I politely decline a wedding invitation?",
    "What's a good beginner workout routine for someone with no equipment?",
    "How can I make my small apartment feel bigger?",
    "My coworker keeps taking credit for my work. What should I do?",
    "What are good houseplants for a room that gets very little sunlight?",
    "How much water should I drink in a day?",
    "I just adopted a rescue dog who is scared of everything. How can I help her settle in?",
    "What should I look for when buying a used car?",
]

TRANSLATE = [
    "Translate 'Where is the train station?' into German.",
    "How do you say 'thank you very much' in Japanese?",
    "Translate 'I would like a table for two, please' into French.",
    "What does 'carpe diem' mean?",
    "Translate into English: 'Je voudrais réserver une chambre pour deux nuits.'",
    "Translate into English: 'Ich habe meinen Schlüssel im Büro vergessen.'",
    "Was bedeutet das Wort „Fernweh“ auf Englisch?",
    "请把“今天天气很好”翻译成英文。",
    "How do you say 'good morning' in Spanish, Italian and Portuguese?",
    "Translate 'See you tomorrow 👋' into Korean.",
]

REWRITE = [
    "Make this sentence more formal: 'Hey, can you send me that file asap?'",
    "Rewrite 'The meeting was postponed by the manager' in the active voice.",
    "Fix the grammar: 'Me and him goes to the store every days.'",
    "Make this shorter: 'Due to the fact that it was raining, we made the decision to stay indoors.'",
    "Rephrase 'I can't come to the party' so it sounds friendlier.",
    "Give me a more positive way to say 'this project is behind schedule.'",
    "Turn 'buy milk, call mom, fix bike' into a polite to-do list for my roommate.",
    "Rewrite 'The product is good' so it sounds more exciting.",
]

SHORT_PROMPTS = {
    "trivia": TRIVIA,
    "how-to": HOW_TO,
    "explain": EXPLAIN,
    "math": MATH,
    "code": CODE,
    "creative": CREATIVE,
    "advice": ADVICE,
    "translate": TRANSLATE,
    "rewrite": REWRITE,
}

# ---------------------------------------------------------------------------------------------
# Medium prompts (40-200 words): a request template followed by a pasted context snippet.
# Templates and snippets share a "kind"; every snippet is paired with TEMPLATES_PER_SNIPPET
# different templates of its kind, so each (template, snippet) combination appears once.
# ---------------------------------------------------------------------------------------------

MEDIUM_TEMPLATES = {
    "email": [
        ("rewrite", "Rewrite this email to sound more polite and professional:"),
        ("rewrite", "Make this email shorter without losing any important details:"),
        ("summarize", "Summarize this email in one sentence:"),
        ("extract", "What is the sender asking for in this email? List the action items."),
        ("advice", "Draft a short reply to this email for me."),
        ("translate", "Translate this email into Spanish:"),
    ],
    "product": [
        ("rewrite", "Rewrite this product description so it's more persuasive:"),
        ("creative", "Write three short taglines based on this product description:"),
        ("extract", "Extract the product name, price and key features from this listing as JSON:"),
        ("summarize", "Summarize this product description in under 20 words:"),
        ("advice", "Who is the target customer for this product, and why?"),
        ("translate", "Translate this product description into French:"),
    ],
    "code": [
        ("code", "What does this function do?"),
        ("code", "Find the bug in this code and explain how to fix it:"),
        ("code", "Add docstrings and comments to this code:"),
        ("code", "How could I make this code faster or cleaner?"),
        ("code", "Write two or three unit tests for this function:"),
        ("explain", "Explain this code line by line to a beginner:"),
        ("code", "Translate this code into Go:"),
    ],
    "paragraph": [
        ("rewrite", "Rewrite this paragraph so it is easier to read:"),
        ("rewrite", "Proofread this paragraph and list any changes you would make:"),
        ("summarize", "Give me a one-sentence summary of this paragraph:"),
        ("explain", "Explain this to a ten-year-old:"),
        ("translate", "Translate this paragraph into German:"),
        ("creative", "Suggest three possible titles for this paragraph:"),
    ],
    "notes": [
        (
            "extract",
            "Turn these notes into a list of action items, with who is responsible for each one where it is mentioned:",
        ),
        ("summarize", "Summarize these notes in two sentences:"),
        ("rewrite", "Rewrite these notes as a short, friendly update email:"),
        ("extract", "Pull out every date and deadline mentioned in these notes:"),
        ("advice", "What's missing from these notes that I should follow up on?"),
    ],
}

EMAIL_SNIPPETS = [
    """Hi Marcus,

I still haven't received the invoice for the March consulting work. I need it by Friday or it won't get paid this quarter. Also the numbers on the last one were wrong, so double check them this time. Send it to accounts@brightlinestudio.com, not to me.

Dana""",
    """Dear neighbours,

This is a reminder that the building's water will be shut off on Tuesday 14 May from 9am until roughly 1pm while the plumbers replace the main valve in the basement. Please fill a kettle or a few bottles beforehand. The lift will keep working as normal. If you have any questions, knock on flat 2B or call me on 07700 900418.

Best wishes,
Priya (building committee)""",
    """Team,

Quick update on the Halvorsen account. They loved the first round of designs but want the logo bigger, the blue darker, and the tagline rewritten because their legal department flagged the word "guaranteed". They have also moved the launch from June 3 to May 27, so we lose a week. I need the revised files on the shared drive by Thursday at noon so I can review them before the client call on Friday morning. Tell me today if that isn't doable.

Jonas""",
    """Hello,

I ordered a pair of hiking boots (order #48213) on the 2nd and they arrived yesterday, but they are a size 43 instead of the 42 I ordered, and the box was badly damaged. I would like to exchange them for the correct size rather than get a refund, because I need them for a trip at the end of the month. Could you tell me how to send them back and whether I have to pay for the return shipping?

Regards,
Lucía Fernández""",
    """hey all, so the offsite is happening!! we booked the lake house for the 19th-21st, it sleeps 14 so some people will have to share rooms. carpools leave from the office at 8 on friday. bring warm clothes, it gets cold at night. food is covered but if you have allergies tell me by monday. also we need someone to organise the quiz night, any volunteers?? - sam""",
    """Dear Dr. Okafor,

My name is Elena Petrova and I am a second-year master's student in environmental engineering. I read your recent paper on low-cost sensors for monitoring river water quality and found it very relevant to my thesis, which looks at nitrate runoff from farms in the Danube basin. Would you have fifteen minutes in the coming weeks for a short video call? I would be especially grateful for advice on calibrating the sensors in cold water.

Kind regards,
Elena Petrova""",
]

PRODUCT_SNIPPETS = [
    "The Tern Go 2 is a folding electric bike that weighs just 16 kg and folds in under ten seconds. The removable 400 Wh battery gives up to 70 km of range on a single charge, and the integrated lights switch on automatically at dusk. It comes with mudguards, a rear rack rated for 25 kg, and a two-year warranty. Price: $1,899.",
    "Handmade in small batches in Vermont, our Maple Walnut Granola is baked slowly with rolled oats, toasted walnuts, pumpkin seeds and pure maple syrup. No refined sugar, no palm oil, and nothing artificial. Enjoy it with yogurt, with milk, or straight from the bag. Each 340 g resealable pouch costs $9.50, or $48 for a box of six.",
    "The Lumio desk lamp offers three colour temperatures, from a warm 2700K to a cool 6500K, and ten brightness levels controlled by a touch strip on the base. A built-in USB-C port charges your phone while you work. The aluminium arm rotates 180 degrees and the head tilts, so you can point the light exactly where you need it. Available in black, white and sage green for 59 euros.",
    "Meet Pebble, the kids' smartwatch that lets parents stay in touch without handing over a phone. Pebble supports voice calls to up to ten approved contacts, GPS location sharing, and a school mode that silences everything except emergency calls during class hours. It is water resistant to 30 metres, the battery lasts two days, and there are no games or social media. Watch: $149. Plan: $10 per month.",
    "This 12-piece stainless steel cookware set includes 8- and 10-inch frying pans, 2- and 3-quart saucepans with lids, a 5-quart sauté pan and an 8-quart stockpot. The tri-ply construction heats evenly and works on gas, electric and induction hobs. The handles stay cool on the stove, and every piece is oven safe up to 260°C and dishwasher safe. Regular price $329, now $249 for a limited time.",
]

# The order matters: with the rotation in medium_pairs(), the snippets that really contain a
# bug (the first, third and sixth) are the ones paired with "Find the bug".
CODE_SNIPPETS = [
    """I wrote this for a homework assignment about grades, and my teacher said it can crash on some inputs, but I can't see where:

```python
def average(numbers):
    total = 0
    for n in numbers:
        total += n
    return total / len(numbers)
```""",
    """This is from a data pipeline at work. We use it to split a big list of customer records into batches before sending them to an API that only accepts a few hundred records per request:

```python
def chunk(items, size):
    out = []
    for i in range(0, len(items), size):
        out.append(items[i:i + size])
    return out
```""",
    """A coworker wrote this to find the most common words in our support tickets. It mostly works, but words like 'refund' and 'refund's' end up counted separately:

```python
def top_words(path, n=10):
    counts = {}
    with open(path) as f:
        for line in f:
            for word in line.lower().split():
                word = word.strip(".,!?;:()")
                if word:
                    counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
    return ranked[:n]
```""",
    """This check runs on lists of about 50,000 order ids every night, and the whole job has become really slow since the store got busier:

```python
def has_duplicates(items):
    for i in range(len(items)):
        for j in range(len(items)):
            if i != j and items[i] == items[j]:
                return True
    return False
```""",
    """I copied this JavaScript from a blog post to stop my search box from sending a request on every keystroke. It works, but I don't really understand how:

```javascript
function debounce(fn, wait) {
  let timer;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), wait);
  };
}
```""",
    """I saw this Fibonacci function in a code review, and someone left a comment saying the default argument is "a clever trick that will bite us later":

```python
def fib(n, memo={}):
    if n in memo:
        return memo[n]
    if n < 2:
        return n
    memo[n] = fib(n - 1, memo) + fib(n - 2, memo)
    return memo[n]
```""",
    """Here is a binary search I wrote while practising for coding interviews. The list passed in is always sorted in ascending order:

```python
def binary_search(arr, target):
    lo, hi = 0, len(arr)
    while lo < hi:
        mid = (lo + hi) // 2
        if arr[mid] < target:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(arr) and arr[lo] == target:
        return lo
    return -1
```""",
]

PARAGRAPH_SNIPPETS = [
    "Our company is committed to leveraging synergies across all of our verticals in order to drive sustainable value for stakeholders going forward. In the upcoming fiscal year we will be focusing on operational excellence, customer centricity and a best-in-class digital experience, while at the same time right-sizing our cost base where it makes sense to do so.",
    "Tardigrades, sometimes called water bears, are microscopic animals about half a millimetre long. They live almost everywhere, from moss on city walls to sediments at the bottom of the ocean. When their surroundings dry out they curl into a ball called a tun, lose almost all of their water and slow their metabolism to nearly zero. In this state they can survive freezing, boiling, intense radiation and even the vacuum of space, and they revive within hours once they are given water again.",
    "so basically the reason i was late is the bus didnt come and then when it came it was full so i had to wait for the next one and by then it was like 9:20 and i texted my manager but she didnt see it because she was in a meeting, anyway i got there at 9:45 and she was kind of annoyed which i get but it wasnt really my fault",
    "The city's new congestion charge, which came into force in January, requires drivers to pay eight euros to enter the central zone between 7am and 7pm on weekdays. Officials say traffic in the zone has fallen by eighteen percent and that bus journeys have become six minutes faster on average. Shop owners are divided: some report fewer customers arriving by car, while others say the quieter streets have brought more people in on foot.",
    "Thank you for your application for the position of junior graphic designer. We received a very large number of applications and, after careful consideration, we have decided not to move forward with your application at this time. We will keep your details on file and may contact you if a suitable position becomes available in the future. We wish you every success in your job search.",
    "Sleep is not a passive state in which the brain simply switches off. During deep sleep the brain replays and strengthens the memories formed during the day, and a network of channels clears away waste proteins that build up while we are awake. People who regularly sleep less than six hours tend to have poorer concentration, weaker immune responses and a higher risk of heart disease, even when they feel that they have adapted to it.",
    "The Great Molasses Flood happened in Boston on 15 January 1919, when a huge storage tank burst and released more than eight million litres of molasses into the streets of the North End. The wave, several metres high at first, moved at around 55 kilometres per hour, destroying buildings and killing 21 people. Residents claimed that on hot summer days the neighbourhood smelled of molasses for decades afterwards.",
]

NOTES_SNIPPETS = [
    """Marketing sync, Monday 3 June
- Attendees: Ravi, Claire, Tomás, Mei
- Spring campaign: click-through 2.1%, above target; Claire to send the full report by Wednesday
- New website banner: Tomás still waiting on photos from the agency, chase them today
- Q3 budget not approved yet, Ravi meeting finance on Thursday
- Mei proposed a customer newsletter, everyone agreed to try one issue in July
- Next sync: 17 June""",
    """Parents' committee, school hall, 7pm
Bake sale raised £612, thanks to everyone who helped. The quote for repairing the playground fence came in at £2,300, which is too high; Joanne will get two more quotes before the half-term break. Summer fair confirmed for Saturday 6 July. We still need volunteers for the tombola and the face painting stand. Mr Adeyemi asked for help clearing out the library on 22 June. Next meeting moved to 2 July because of the school play.""",
    """apartment move - notes from call with Jamie
keys handover on the 28th at 10am, landlord wants photos of the meter readings. movers booked for the 27th, they need a parking permit from the council (apply by the 20th!!). internet: old provider needs 30 days notice - are we already too late? check. change address at the bank, dentist, car insurance. sell the old sofa before the 25th or book a bulky waste pickup. jamie packs the kitchen, i do books and the office.""",
    """Sprint retro, platform team
Went well: deploys down to 12 minutes, zero incidents this sprint, onboarding doc finally updated.
Didn't go well: flaky integration tests cost us about two days, too many ad hoc requests from sales, the staging database ran out of disk on Tuesday.
Ideas: quarantine flaky tests automatically, set up a request form for sales (Anika), add disk alerts for staging (Li Wei, by Friday), pair more on the billing migration.""",
    """Trip planning - Lisbon long weekend
Flights: TAP, leave Thu 12 Sept 18:40, back Mon 16 Sept 07:15. Hotel in Alfama booked, check-in from 3pm, city tax has to be paid in cash. Want to do: tram 28 early in the morning, Belém tower and pastéis de Belém, day trip to Sintra (book Pena Palace tickets online, they sell out), fado dinner on Saturday. Still to sort out: airport transfer, travel insurance, and whether Carla is coming.""",
]

MEDIUM_SNIPPETS = {
    "email": EMAIL_SNIPPETS,
    "product": PRODUCT_SNIPPETS,
    "code": CODE_SNIPPETS,
    "paragraph": PARAGRAPH_SNIPPETS,
    "notes": NOTES_SNIPPETS,
}

# ---------------------------------------------------------------------------------------------
# Long prompts (400-900 words): a task instruction followed by a document assembled from
# 5-9 of the hand-written paragraphs below (a mixed news digest / notes file).
# ---------------------------------------------------------------------------------------------

LONG_INSTRUCTIONS = [
    ("summarize", "Summarize the following notes in three sentences:"),
    ("summarize", "Summarize the following article in three sentences:"),
    ("extract", "List the key facts in this report:"),
    (
        "summarize",
        "Write a one-paragraph summary of this newsletter for people who don't have time to read it:",
    ),
    (
        "extract",
        "Pull out every number, date and name mentioned in the text below, grouped by topic:",
    ),
    ("explain", "Read the following digest and tell me which item matters most, and why:"),
    ("creative", "Write a short headline for each section of this digest:"),
    ("extract", "Turn the following text into a bulleted list of the main points:"),
]

LONG_PARAGRAPHS_A = [
    # City council meeting
    "At Tuesday evening's city council meeting, members voted seven to two in favour of a plan to build protected bike lanes along Harbour Street and Mill Road. The project will cost an estimated 4.2 million dollars, most of it covered by a regional transport grant. Several shop owners spoke against the plan, arguing that removing forty parking spaces would hurt their business. Councillor Amara Osei replied that a pilot on nearby Elm Street had increased foot traffic by twelve percent. Construction is expected to begin in early spring and last about five months.",
    "Tuesday's council meeting also approved the central library's request to extend its opening hours. From next month, the central branch will stay open until 9pm on weekdays and will open on Sunday afternoons for the first time in over a decade. The change will be funded by cutting the budget for printed brochures and by two new part-time positions paid for by a private donation. Head librarian Paul Kessler said the evening hours were the most common request in last year's community survey, especially from students and shift workers.",
    # Product launch
    "On Thursday the smart home company Nestwell unveiled its new thermostat, the Nestwell Mini, at an event in Austin. The device is about the size of a coaster, costs 129 dollars and, according to the company, can cut heating bills by up to fifteen percent by learning when a household is usually away. Unlike earlier models it works without a hub and connects directly to home Wi-Fi. Pre-orders opened immediately, and the first units are due to ship in the second week of October.",
    "Early reviews of the Nestwell Mini have been mostly positive, with reviewers praising the simple setup and the clear display. Some criticised the fact that several features, including detailed energy reports, require a subscription of three dollars a month. Privacy campaigners have also asked the company to explain how long it keeps temperature and occupancy data. A Nestwell spokesperson said that all data is stored in the European Union or the United States, depending on the customer's location, and that users can delete it at any time from the app.",
    # Hiking trip
    "We set off from the trailhead at Lake Vallon just after six in the morning, when the air was still cold enough to see our breath. The first three kilometres climbed steadily through pine forest, and the path was wet from the rain two days earlier. By eight we reached the old shepherd's hut, where we stopped for coffee and bread with cheese. Tom's knee was already bothering him, so we redistributed some of the weight from his pack and agreed to take the descent slowly.",
    "The last stretch to the summit of Mont Vallon was a scramble over loose rock, marked only by small cairns and the occasional splash of red paint. It took us almost two hours to cover the final four hundred metres of height. At the top the wind was strong, but the view was worth every step: three lakes below us, the glacier to the north and, far to the east, the outline of the next valley. We stayed only twenty minutes because clouds were building in the west.",
    "On our Mont Vallon hike, the descent turned out to be the hardest part of the day. A thunderstorm caught us about halfway down, and we spent forty minutes sheltering under an overhang while the rain turned the path into a stream. When it passed we continued carefully, using poles on the steepest sections. We reached the car at a quarter past six, soaked and tired, having covered nineteen kilometres and about 1,300 metres of climbing. Next time we will start an hour earlier and check the forecast again at the hut.",
    # Research finding
    "Researchers at the University of Leeds have found that bumblebees can learn to solve simple puzzles by watching other bees. In a series of experiments, bees were trained to push a small ball into the centre of a platform to receive a sugar reward. Bees that had watched a trained bee perform the task learned it faster than those that had seen the ball move by itself, guided by a hidden magnet. The team says the results suggest that social learning in insects is more flexible than previously thought.",
    "The bumblebee study, published in the journal Behavioural Ecology, involved 140 bees from six colonies and was carried out over two summers. Lead author Dr. Hannah Mbeki said the most surprising result was that several bees improved on the method they had observed, moving the ball by a shorter route. The researchers caution that the experiments took place in a laboratory and that it is not yet clear how often bees use this kind of learning in the wild. They now plan to repeat the tests with honeybees and solitary bees.",
    # Quarterly results
    "Fernhill Foods reported revenue of 812 million dollars for the third quarter, up six percent from the same period last year, helped by strong sales of its frozen meals and plant-based snacks. Operating profit rose to 74 million dollars, although margins were squeezed by higher packaging and transport costs. The company's shares rose four percent in early trading after the results beat analysts' expectations. Chief executive Linda Marsh said demand had held up well despite shoppers trading down to cheaper brands in several markets.",
    "Looking ahead, Fernhill Foods raised its forecast for the full year and now expects revenue growth of between five and seven percent. The company plans to open a second factory in Poland next year and to reduce the number of products it sells by about a fifth, focusing on its best-selling lines. It also announced a share buyback of up to 150 million dollars. Analysts welcomed the update but warned that a planned increase in sugar taxes in two of its largest markets could weigh on sales of its desserts.",
    # School sports day
    "Greenfield Primary held its annual sports day on Friday under clear blue skies, with more than three hundred pupils taking part in races, relays and the much-loved egg-and-spoon contest. Parents lined the field to cheer, and the parents' committee raised 480 pounds selling lemonade and cakes. The Blue House won the overall trophy for the second year in a row, narrowly ahead of the Green House. Head teacher Mrs Akande thanked the staff and volunteers and announced that next year's event will include a wheelchair race.",
    # Bakery opening
    "After two years of selling bread at weekend markets, Sofia and Mateus Lima have opened their first shop on Carter Lane. The bakery, called Forno, specialises in long-fermented sourdough, Portuguese custard tarts and a cornbread recipe from Mateus's grandmother. On opening day the queue stretched around the corner, and everything had sold out by half past eleven. The couple say they will bake in two shifts from next week to keep up with demand and hope to hire three more staff before the summer.",
    # Storm report
    "Storm Elin brought winds of up to 120 kilometres per hour to the west coast overnight, bringing down trees and power lines across the region. Around 45,000 homes were without electricity on Sunday morning, and engineers said some rural areas might not be reconnected until Tuesday. Ferry services to the islands were cancelled, and several roads were closed by flooding. The weather service has issued a yellow warning for further heavy rain on Monday and advised people to avoid travelling unless necessary.",
    # Library renovation
    "The renovation of the old town library, closed since last spring, is now expected to finish in November, two months later than planned. Builders discovered asbestos in the ceiling of the reading room, which had to be removed by a specialist firm before work could continue. The project's budget has grown from 3.1 to 3.6 million euros. When the library reopens it will have a new children's floor, a small recording studio that members can book, and a café run by a local social enterprise.",
    # Football report
    "Riverside United came from two goals down to draw 2-2 with Castleford in a dramatic match on Saturday afternoon. Castleford led at half-time thanks to a header from their captain and a penalty just before the break. Riverside's manager made three substitutions at the start of the second half, and the changes paid off: the young winger Kofi Boateng scored in the 64th minute and set up the equaliser in stoppage time. The result leaves Riverside sixth in the table, three points outside the promotion places.",
    # Concert review
    "The city orchestra opened its autumn season on Friday with a programme of Sibelius and Dvořák in a sold-out concert hall. The guest conductor, Mireille Dubois, took the Fifth Symphony at a brisker pace than many listeners will be used to, and the famous horn theme in the finale felt urgent rather than grand. After the interval, the young cellist Jonas Lindqvist gave a warm and confident performance of the Dvořák concerto. The audience called him back three times, and he rewarded them with a short Bach sarabande.",
    # Food festival
    "This weekend's food festival in Riverside Park attracted an estimated 22,000 visitors over two days, a record for the event. More than ninety stalls sold dishes from around the world, from Ethiopian injera to Korean fried chicken and Peruvian ceviche. Organisers introduced a deposit scheme for reusable plates and cups this year, which they say reduced waste by more than half. The only complaints concerned the long queues for the most popular stalls, some of which ran out of food before the end of Saturday.",
    # Hospital wing
    "The new wing of St. Mary's Hospital opened to patients on Monday, adding 120 beds, eight operating theatres and a larger emergency department. The 95-million-pound building took three years to complete and was designed so that patients in most rooms can see the garden outside. Hospital managers say the extra capacity should reduce waiting times for planned operations, which have grown to an average of 19 weeks. Recruiting enough nurses remains the main challenge, and the hospital is running an open day for applicants next month.",
    # Train strike
    "Train drivers on the northern network will strike for 48 hours from Wednesday after talks over pay and working hours broke down. The union says its members have been offered a three percent increase, well below inflation, and that the proposed new rosters would mean more weekend shifts. The rail operator says the offer is fair and that changes to the rosters are necessary to run more trains on Sundays. Only about a third of normal services are expected to run, and passengers are advised to travel on other days if they can.",
]

LONG_PARAGRAPHS_B = [
    # Farmers' market
    "The Saturday farmers' market will move from the car park behind the town hall to the riverside square from the first weekend of May. Organisers say the new site has room for forty stalls instead of twenty-five, as well as shade from the trees and easier access for wheelchairs and prams. Opening hours stay the same, from 8am to 1pm. Several long-standing traders, including the cheese maker Greta Holm and the Barnes family's organic vegetable stall, have already confirmed that they will move with the market.",
    # Museum exhibition
    "The Museum of Natural History has opened a new exhibition on the deep sea, featuring more than two hundred specimens collected over a century of scientific expeditions. Highlights include a giant squid preserved in a tank eight metres long, glowing models of anglerfish, and a full-size replica of the submersible that first reached the bottom of the Mariana Trench in 1960. The exhibition runs until January. Entry is free for children under twelve, and the museum recommends booking a time slot online at weekends.",
    # Software outage
    "On Monday between 09:12 and 10:47 UTC, customers were unable to log in to the web dashboard, and about eight percent of API requests failed with server errors. The cause was a configuration change to the authentication service that reduced the size of its connection pool. The change had passed review and automated tests, but the tests did not simulate the load of a Monday morning. Engineers rolled back the change at 10:31, and error rates returned to normal within sixteen minutes. No customer data was lost or exposed.",
    "After Monday's dashboard outage, the engineering team has agreed on three follow-up actions. First, every change to connection pool settings will now require a load test against a copy of production traffic. Second, configuration changes will be rolled out to ten percent of servers for thirty minutes before the rest. Third, the status page will be updated automatically when error rates cross a threshold, rather than by hand, after customers complained that it still showed all systems working for the first forty minutes of the incident.",
    # Archaeology
    "Archaeologists excavating a building site in the centre of York have uncovered the remains of a Roman bathhouse, including part of a heated floor and a small plunge pool lined with waterproof mortar. Coins found in the rubble suggest the baths were in use in the late second century. The developer has agreed to pause construction for six weeks so that the site can be fully recorded, and the city council is discussing whether part of the floor could be preserved and displayed in the lobby of the new office building.",
    # Marathon
    "More than 14,000 runners took part in Sunday's city marathon, which was held in cool, dry weather ideal for fast times. The men's race was won by Daniel Kiprotich in two hours, six minutes and forty seconds, a new course record, while Ayaka Mori won the women's race in two hours, twenty-two minutes. Organisers said 312 runners received medical treatment, mostly for blisters and cramps, and none was seriously hurt. The event raised an estimated 1.8 million euros for charities, including the children's hospital and a local food bank.",
    # Housing prices
    "House prices in the region fell for the third month in a row in March, according to figures from the national statistics office. The average home now costs 287,000 pounds, down 2.4 percent from its peak last autumn. Higher mortgage rates are the main reason, with the typical two-year fixed deal now above five percent. Estate agents say the number of first-time buyers has dropped sharply, while rents continue to rise because many would-be buyers are staying in rented homes for longer than they had planned.",
    # Beach cleanup
    "Around 150 volunteers turned out on Saturday morning for the spring beach clean at Sandy Bay, organised by the local surf club. In three hours they collected more than 600 kilograms of rubbish, including fishing nets, plastic bottles, a shopping trolley and, to everyone's surprise, a working electric guitar. Most of the plastic will be sent to a recycling plant that turns it into park benches. The surf club's chair, Imogen Price, said the amount of rubbish was lower than last year, which she called encouraging.",
    # Space mission
    "The European Space Agency confirmed on Wednesday that its Aurora probe has entered orbit around Jupiter after a journey of almost eight years. The probe fired its main engine for 54 minutes to slow down enough to be captured by the planet's gravity. Over the next three years it will make 35 close passes of the icy moons Europa and Ganymede, measuring the thickness of their ice shells and searching for signs of the liquid oceans that scientists believe lie beneath. The first images are expected within a month.",
    # Startup funding
    "Tidewater, a two-year-old startup that makes software for managing the batteries of electric delivery vans, has raised 28 million dollars in new funding led by a venture capital firm from Berlin. The company says its software can extend battery life by up to twenty percent by planning when and how fast each van is charged. It currently works with eleven delivery companies in Europe and plans to use the new money to hire sixty engineers and open an office in Chicago before the end of the year.",
    # Wolves
    "Wildlife officials have confirmed that a pack of wolves has settled in the national park for the first time in more than a century. Camera traps recorded at least five animals, including two pups, in the northern forests during the winter. Farmers in the surrounding villages have expressed concern about their sheep, and the park authority has promised to pay compensation for any animals killed and to help pay for electric fences and guard dogs. Tourism operators, by contrast, hope the wolves will attract more visitors.",
    # Referendum
    "Voters in the canton will decide in a referendum on 22 September whether to ban new oil and gas heating systems in homes from 2030. Supporters say the measure is needed to meet the region's climate targets, since heating accounts for almost a third of its emissions. Opponents, including the homeowners' association, argue that heat pumps are still too expensive for many families and that the ban would push up rents. The latest poll shows 51 percent in favour, with about one voter in ten still undecided.",
    # Coffee prices
    "Coffee drinkers should expect to pay more for their morning cup this year after the price of arabica beans reached its highest level in more than a decade. A drought in Brazil and heavy rain in Vietnam have reduced harvests in two of the world's largest producing countries, while shipping costs have also risen. Several large roasters have already announced price increases of between ten and fifteen percent. Independent cafés say they are trying to absorb part of the cost, but many expect to raise prices by the summer.",
    # Electric buses
    "The city's transport authority has taken delivery of the first 30 of its 120 new electric buses, which will enter service on the number 4 and number 11 routes next month. Each bus can run for about 300 kilometres on a single charge, enough for a full day's service, and will be recharged overnight at the depot on Station Road. The authority says the new fleet will cut carbon emissions from public transport by a quarter and will make the routes noticeably quieter for people living along them.",
    # Remote work study
    "A new survey of 6,000 office workers suggests that employees who work from home two or three days a week are as productive as those who come in every day, and less likely to quit. The study, carried out by researchers at two business schools, found that hybrid workers were particularly positive about the time saved on commuting, which averaged seventy minutes a day. However, managers reported that training new staff had become harder, and younger employees said they missed learning informally from more experienced colleagues.",
    # Book festival
    "The tenth annual book festival opens on Friday with more than eighty events spread across five venues in the old town. This year's programme includes talks by the novelist Chiara Benedetti, whose latest book won the European Fiction Prize, and a panel on translation with writers from Japan, Nigeria and Chile. There are also writing workshops for teenagers and a poetry slam on Saturday night. Most events cost eight euros, and a weekend pass for all of them is available for forty-five euros.",
    # Flood defences
    "Work has started on a new flood defence scheme along the river, two years after heavy rain flooded more than 300 homes in the lower town. The 18-million-pound project includes a raised earth embankment, glass flood walls along the promenade and a storage area upstream where water can be held during storms. The Environment Agency says the scheme will protect around 900 properties. Some residents have objected to the glass walls, arguing that they will spoil the view of the river, but most welcomed the work.",
    # Chess tournament
    "A fourteen-year-old schoolgirl from Valencia, Lucía Ortega, has won the national chess championship, becoming the youngest champion in the tournament's history. She finished the nine rounds with seven wins and two draws, half a point ahead of the defending champion, whom she beat in the final round after a five-hour game. Ortega started playing at the age of six at a club near her school. She will represent the country at the European championship in Budapest in November, where she will be among the youngest players.",
    # Airport expansion
    "The regional airport has submitted plans for a second terminal that would allow it to handle eight million passengers a year, nearly double the current number. The airport says the expansion would create 2,000 jobs and bring in new routes to North America and the Middle East. Local residents' groups have promised to fight the plans, pointing to increased noise and traffic on already busy roads. A public consultation will run for twelve weeks, and a final decision from the planning authority is expected next spring.",
    # Community garden
    "The community garden on Wilton Street celebrated its fifth birthday on Sunday with a harvest lunch for more than a hundred neighbours. What started as an empty lot covered in broken glass now has thirty raised beds, a greenhouse, four beehives and a small orchard of apple and plum trees. Volunteers grow vegetables for the local food bank as well as for themselves. Founder Mrs Teodora Ilić said the waiting list for a bed has grown to sixty names, and the group is looking for a second site nearby.",
]

LONG_PARAGRAPHS = LONG_PARAGRAPHS_A + LONG_PARAGRAPHS_B


# ---------------------------------------------------------------------------------------------
# Building the rows
# ---------------------------------------------------------------------------------------------


def word_count(text: str) -> int:
    """Whitespace-separated words, the measure used for every length bound in this script."""
    return len(text.split())


def short_rows() -> list[tuple[str, str]]:
    """(source, prompt) for every hand-written short prompt."""
    return [(source, prompt) for source, prompts in SHORT_PROMPTS.items() for prompt in prompts]


def medium_rows() -> list[tuple[str, str]]:
    """Pair each snippet with TEMPLATES_PER_SNIPPET consecutive templates of its kind.

    The template index advances by TEMPLATES_PER_SNIPPET per snippet, so the templates of a
    kind are used about equally often and no (template, snippet) combination repeats.
    """
    rows = []
    for kind, snippets in MEDIUM_SNIPPETS.items():
        templates = MEDIUM_TEMPLATES[kind]
        for j, snippet in enumerate(snippets):
            for t in range(TEMPLATES_PER_SNIPPET):
                source, request = templates[(TEMPLATES_PER_SNIPPET * j + t) % len(templates)]
                rows.append((source, f"{request}\n\n{snippet}"))
    return rows


def long_prompt(rng: random.Random, instruction: str) -> str:
    """Draw paragraphs until the instruction plus document falls inside LONG_WORDS."""
    low, high = LONG_WORDS
    while True:
        count = rng.randint(*LONG_PARAGRAPHS_PER_DOC)
        # Keep the drawn paragraphs in pool order so that related paragraphs (the three about
        # one hike, a report and its follow-up) read in their natural sequence.
        picked = sorted(rng.sample(range(len(LONG_PARAGRAPHS)), count))
        document = "\n\n".join(LONG_PARAGRAPHS[i] for i in picked)
        prompt = f"{instruction}\n\n{document}"
        if low <= word_count(prompt) <= high:
            return prompt


def long_rows() -> list[tuple[str, str]]:
    """N_LONG documents, cycling through the task instructions."""
    rng = random.Random(LONG_SEED)
    rows = []
    for i in range(N_LONG):
        source, instruction = LONG_INSTRUCTIONS[i % len(LONG_INSTRUCTIONS)]
        rows.append((source, long_prompt(rng, instruction)))
    return rows


# ---------------------------------------------------------------------------------------------
# Checks, output and summary
# ---------------------------------------------------------------------------------------------


def check_bounds(name: str, texts: list[str], low: int, high: int) -> None:
    """Fail loudly if any text's word count falls outside [low, high]."""
    bad = [(word_count(t), t[:60]) for t in texts if not low <= word_count(t) <= high]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} outside {low}-{high} words, e.g. {bad[0]}")


def check_rows(short: list, medium: list, long: list) -> None:
    """Validate length classes, the paragraph pool and uniqueness before writing anything."""
    check_bounds("paragraph", LONG_PARAGRAPHS, *PARAGRAPH_WORDS)
    check_bounds("short", [p for _, p in short], 1, SHORT_MAX_WORDS)
    check_bounds("medium", [p for _, p in medium], *MEDIUM_WORDS)
    check_bounds("long", [p for _, p in long], *LONG_WORDS)
    prompts = [p for _, p in short + medium + long]
    if len(set(prompts)) != len(prompts):
        raise SystemExit("duplicate prompts")


def build_rows() -> list[dict[str, str]]:
    """All rows, shuffled with SHUFFLE_SEED and numbered s-0001... in their final order."""
    short, medium, long = short_rows(), medium_rows(), long_rows()
    check_rows(short, medium, long)
    rows = short + medium + long
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return [
        {"id": f"s-{i:04d}", "prompt": prompt, "source": source}
        for i, (source, prompt) in enumerate(rows, start=1)
    ]


def quick_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The QUICK_PER_SOURCE shortest prompts of each source (under QUICK_MAX_CHARS), in file
    order."""
    picked = set()
    for source in sorted({row["source"] for row in rows}):
        mine = [r for r in rows if r["source"] == source and len(r["prompt"]) <= QUICK_MAX_CHARS]
        mine.sort(key=lambda r: (len(r["prompt"]), r["id"]))
        picked.update(r["id"] for r in mine[:QUICK_PER_SOURCE])
    return [row for row in rows if row["id"] in picked]


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    """One object per line, keys in COLUMNS order, UTF-8 without escaping, '\\n' endings."""
    text = "".join(
        json.dumps({c: row[c] for c in COLUMNS}, ensure_ascii=False) + "\n" for row in rows
    )
    data = text.encode("utf-8")
    if len(data) > MAX_JSONL_BYTES:
        raise SystemExit(f"{path.name} would be {len(data)} bytes (limit {MAX_JSONL_BYTES})")
    path.write_bytes(data)


def write_parquet(rows: list[dict[str, str]], path: Path) -> None:
    """The same rows as a Parquet table of string columns, in COLUMNS order."""
    table = pa.table({c: pa.array([row[c] for row in rows], type=pa.string()) for c in COLUMNS})
    pq.write_table(table, path)


def summary(rows: list[dict[str, str]]) -> str:
    """One line: row count and min/median/max words per prompt."""
    counts = [word_count(row["prompt"]) for row in rows]
    return (
        f"wrote {len(rows)} rows to {OUT_DIR.name}/{JSONL_PATH.name} and "
        f"{OUT_DIR.name}/{PARQUET_PATH.name}; words per prompt "
        f"min={min(counts)} median={statistics.median(counts):g} max={max(counts)}"
    )


def main() -> None:
    rows = build_rows()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, JSONL_PATH)
    write_parquet(rows, PARQUET_PATH)
    quick = quick_rows(rows)
    write_jsonl(quick, QUICK_PATH)
    print(summary(rows))
    print(f"wrote {len(quick)} of them to {OUT_DIR.name}/{QUICK_PATH.name}")


if __name__ == "__main__":
    main()
