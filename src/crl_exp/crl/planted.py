"""A planted world over a whole dictionary, shaped like steering, for learners on exact tables (no model).

K unit directions with a real SAE decoder's cosine spread: most pairs nearly orthogonal, a few near-twins (clusters
of 8 children at cosine ~0.6 of a parent; DESIGN §10 measured 54 of 200,000 pairs at cosine >= 0.5 on the trained
SAE, this world has about 2e-4 of its pairs there). States of C classes carry the class. The reward of feature f
on class c is ``base + slope * <w_c, d_f>`` (the first-order part real steering rewards show, Spearman 0.5-0.93 on
the embedded model) plus ``bonus`` on one planted feature per class, the ``planted_rank``-th feature by
``<w_c, d_f>``: inside the screen's top 64, not its argmax. The screen (what one backward pass would give) is the
linear part alone, so it ranks the planted feature but cannot say it is best.
"""

from __future__ import annotations

import torch

from crl_exp.reward_table import RewardTable


class PlantedDictionary:
    def __init__(self, n_features: int = 4096, d_model: int = 640, n_classes: int = 4, seed: int = 1234,
                 base: float = 0.2, slope: float = 1.0, bonus: float = 0.3, planted_rank: int = 20,
                 clusters: int = 64, children: int = 8):
        g = torch.Generator().manual_seed(seed)
        parents = torch.nn.functional.normalize(torch.randn(clusters, d_model, generator=g), dim=-1)
        twins = parents.repeat_interleave(children, 0) + 0.8 * torch.nn.functional.normalize(
            torch.randn(clusters * children, d_model, generator=g), dim=-1)
        rest = torch.randn(n_features - len(twins), d_model, generator=g)
        order = torch.randperm(n_features, generator=g)
        self.directions = torch.nn.functional.normalize(torch.cat([twins, rest]), dim=-1)[order]
        self.class_means = torch.randn(n_classes, d_model, generator=g)
        self.w = torch.nn.functional.normalize(torch.randn(n_classes, d_model, generator=g), dim=-1)
        self.linear = self.w @ self.directions.T  # [C, K]
        self.planted = self.linear.argsort(dim=1, descending=True)[:, planted_rank - 1]
        self.n_features, self.d_model, self.n_classes = n_features, d_model, n_classes
        self.base, self.slope, self.bonus, self.planted_rank = base, slope, bonus, planted_rank

    def class_rewards(self) -> torch.Tensor:
        """[C, K] the exact reward of every feature for each class."""
        reward = self.base + self.slope * self.linear
        reward[torch.arange(self.n_classes), self.planted] += self.bonus
        return reward

    def table(self, n_prompts: int, seed: int) -> RewardTable:
        """``n_prompts`` prompts (classes in turn) with noisy states; the unsteered reward is ``base``."""
        cls = torch.arange(n_prompts) % self.n_classes
        noise = torch.randn(n_prompts, self.d_model, generator=torch.Generator().manual_seed(seed))
        states = 3 * self.class_means[cls] + noise
        reward = self.class_rewards()[cls]
        correct = (reward >= self.base + self.bonus / 2).float()
        return RewardTable(list(range(self.n_features)), [f"c{int(c)}/{seed}/{i}" for i, c in enumerate(cls)],
                           reward, correct, torch.full((n_prompts,), self.base), torch.zeros(n_prompts), states)

    def classes_of(self, table: RewardTable) -> torch.Tensor:
        return torch.tensor([int(i.split("/")[0][1:]) for i in table.example_ids])

    def screen(self, table: RewardTable) -> torch.Tensor:
        """[prompts, K] the first-order screen: each feature's predicted reward change (the linear part)."""
        return self.slope * self.linear[self.classes_of(table)]

    @staticmethod
    def static_reward(table: RewardTable) -> float:
        """The best single feature for every prompt (read off the table: an upper bound for static)."""
        return float(table.reward.mean(0).max())

    @staticmethod
    def optimum_reward(table: RewardTable) -> float:
        return float(table.reward.max(1).values.mean())

    def describe(self) -> dict:
        cos = self.directions @ self.directions.T
        upper = cos[torch.triu(torch.ones_like(cos, dtype=torch.bool), 1)]
        screen_rank = (self.linear >= self.linear.gather(1, self.planted[:, None])).sum(1)
        return {"features": self.n_features, "d_model": self.d_model, "classes": self.n_classes,
                "bonus": self.bonus, "slope": self.slope, "planted_rank_in_screen": screen_rank.tolist(),
                "share_of_pairs_cosine_ge_0.5": float((upper >= 0.5).float().mean()),
                "median_abs_cosine": float(upper.abs().median())}
