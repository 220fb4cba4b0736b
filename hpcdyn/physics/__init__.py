"""Physics: what a configuration and a move are, and the generating rates of each system.

Systems (``systems``) are frozen, validated parameter sets whose moves are additive steps on one token;
``rates`` holds the rate-model protocol (configurations -> log-rate of every candidate move) and the true
rates of each system in torch; ``replay`` rebuilds configurations from events. It hands every other stage
the vocabulary they share and imports none of them.
"""
