"""Tabular methods on the book's 3-state Markov decision process (chapter 19): value iteration, Q-value
iteration, TD learning and Q-learning.

transition_probabilities[s][a][s'] is P(s' | s, a), rewards[s][a][s'] the reward of that transition, and
possible_actions[s] the actions allowed in state s (None where an action is not allowed).
"""

from __future__ import annotations

import numpy as np

TRANSITION_PROBABILITIES: list[list[list[float] | None]] = [  # shape [s, a, s']
    [[0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.8, 0.2, 0.0]],
    [[0.0, 1.0, 0.0], None, [0.0, 0.0, 1.0]],
    [None, [0.8, 0.1, 0.1], None],
]
REWARDS: list[list[list[float]]] = [  # shape [s, a, s']
    [[+10, 0, 0], [0, 0, 0], [0, 0, 0]],
    [[0, 0, 0], [0, 0, 0], [0, 0, -50]],
    [[0, 0, 0], [+40, 0, 0], [0, 0, 0]],
]
POSSIBLE_ACTIONS = [[0, 1, 2], [0, 2], [1]]


def transition(state: int, action: int) -> list[float]:
    """P(s' | s, a) for each s'; an error for an action that is not possible in `state`."""
    probabilities = TRANSITION_PROBABILITIES[state][action]
    if probabilities is None:
        raise ValueError(f"action {action} is not possible in state {state}")
    return probabilities


def q_value_iteration(gamma: float = 0.90, iterations: int = 50) -> np.ndarray:
    """Q_{k+1}(s, a) = sum_s' T(s, a, s') [R(s, a, s') + gamma max_a' Q_k(s', a')] (the book's equation 19-3);
    impossible actions keep -inf."""
    q = np.full((3, 3), -np.inf)
    for s, actions in enumerate(POSSIBLE_ACTIONS):
        q[s, actions] = 0.0
    for _ in range(iterations):
        previous = q.copy()
        for s in range(3):
            for a in POSSIBLE_ACTIONS[s]:
                q[s, a] = sum(
                    transition(s, a)[sp] * (REWARDS[s][a][sp] + gamma * previous[sp].max())
                    for sp in range(3)
                )
    return q


def value_iteration(gamma: float = 0.90, iterations: int = 50) -> np.ndarray:
    """V_{k+1}(s) = max_a sum_s' T(s, a, s') [R(s, a, s') + gamma V_k(s')] (the book's equation 19-2)."""
    v = np.zeros(3)
    for _ in range(iterations):
        v = np.array([
            max(sum(transition(s, a)[sp] * (REWARDS[s][a][sp] + gamma * v[sp]) for sp in range(3))
                for a in POSSIBLE_ACTIONS[s])
            for s in range(3)
        ])
    return v


def step(state: int, action: int, rng: np.random.Generator) -> tuple[int, float]:
    next_state = int(rng.choice(3, p=transition(state, action)))
    return next_state, float(REWARDS[state][action][next_state])


def q_learning(gamma: float = 0.90, steps: int = 10_000, alpha0: float = 0.05, decay: float = 0.005,
               seed: int = 42) -> np.ndarray:
    """Q-learning with a random exploration policy and a decaying learning rate alpha = alpha0 / (1 + t decay):
    Q(s, a) <- (1 - alpha) Q(s, a) + alpha (r + gamma max_a' Q(s', a')) (the book's equation 19-5)."""
    rng = np.random.default_rng(seed)
    q = np.full((3, 3), -np.inf)
    for s, actions in enumerate(POSSIBLE_ACTIONS):
        q[s, actions] = 0.0
    state = 0
    for t in range(steps):
        action = int(rng.choice(POSSIBLE_ACTIONS[state]))
        next_state, reward = step(state, action, rng)
        alpha = alpha0 / (1 + t * decay)
        q[state, action] = (1 - alpha) * q[state, action] + alpha * (reward + gamma * q[next_state].max())
        state = next_state
    return q


def td_learning(gamma: float = 0.90, steps: int = 20_000, alpha: float = 0.01, seed: int = 42) -> np.ndarray:
    """TD(0) state values under the uniformly random policy: V(s) <- V(s) + alpha (r + gamma V(s') - V(s))
    (the book's equation 19-4)."""
    rng = np.random.default_rng(seed)
    v = np.zeros(3)
    state = 0
    for _ in range(steps):
        action = int(rng.choice(POSSIBLE_ACTIONS[state]))
        next_state, reward = step(state, action, rng)
        v[state] += alpha * (reward + gamma * v[next_state] - v[state])
        state = next_state
    return v


def discounted_returns(rewards: list[float], gamma: float) -> np.ndarray:
    """Each step's return: its reward plus the discounted return of the step after (chapter 19)."""
    out = np.zeros(len(rewards))
    running = 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out
