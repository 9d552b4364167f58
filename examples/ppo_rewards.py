"""Rule-based rewards for the PPO example: no reward model needed, so the run shows PPO itself.

`positivity` scores a reply by a small sentiment lexicon: +1 per distinct positive word, -1 per
distinct negative word, capped at +-4. Called as reward.function: ppo_rewards.py:positivity.
"""

import re

POSITIVE = {"good", "great", "happy", "love", "wonderful", "amazing", "beautiful", "enjoy", "best", "fun",
            "glad", "excellent", "lovely", "delightful", "fantastic", "joy", "nice", "kind", "bright", "thank"}
NEGATIVE = {"bad", "sad", "hate", "terrible", "awful", "boring", "worst", "angry", "ugly", "poor",
            "sorry", "unfortunately", "difficult", "problem", "pain"}


def positivity(prompts: list[str], responses: list[str]) -> list[float]:
    scores = []
    for text in responses:
        words = set(re.findall(r"[a-z]+", text.lower()))
        score = len(words & POSITIVE) - len(words & NEGATIVE)
        scores.append(float(max(-4, min(4, score))))
    return scores
