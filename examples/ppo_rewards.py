"""Rule-based rewards for the PPO example: no reward model needed, so the run shows PPO itself.

`positivity` scores a reply with a sentiment lexicon: +1 for every positive word, -1 for every
negative word (occurrences, not distinct words, so the signal is dense enough for 8 rollouts a
step), capped at +-5. Called as reward.function: ppo_rewards.py:positivity.
"""

import re

POSITIVE = set("""
admire admired adore adorable amazing awesome beautiful beautifully beauty best bliss blissful breathtaking bright
brilliant calm calming charm charming cheer cheerful comfort comfortable comforting cosy cozy delicious delight
delightful enjoy enjoyable enjoyed enjoying excellent excited exciting fantastic favorite favourite fond fresh friendly
fun gentle glad glorious good grateful great greatest happiness happy heartwarming hope hopeful hug incredible
inspiration inspired inspiring inviting joy joyful joyous kind kindness laugh laughing laughter love loved lovely loving
magical marvelous nice peace peaceful perfect pleasant proud radiant relax relaxed relaxing scenic serene smile smiled
smiles smiling stunning sublime sunny sweet thank thankful thanks treasure vibrant warm warmth welcome welcoming wonder
wonderful
""".split())
NEGATIVE = set("""
afraid angry annoying anxiety anxious awful bad boring chaos chaotic cry crying difficult dreary dull fear frustrated
frustrating gloomy grim hate horrible hurt lonely miserable nightmare pain poor problem rude sad scary sick sorry stress
stressful tears terrible tired ugly unfortunately upset worried worry worst
""".split())
CAP = 5


def positivity(prompts: list[str], responses: list[str]) -> list[float]:
    scores = []
    for text in responses:
        words = re.findall(r"[a-z]+", text.lower())
        score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        scores.append(float(max(-CAP, min(CAP, score))))
    return scores
