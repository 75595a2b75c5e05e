"""Paper reproductions: each module has one `run(out, config, ...)` function and a click
`command` that the CLI registers under the experiment's name."""

EXPERIMENTS = {
    "cnn-fashion-mnist": "datafluence.experiments.cnn_fashion_mnist",
    "knowledge-domains": "datafluence.experiments.knowledge_domains",
    "mislabel-detection": "datafluence.experiments.mislabel_detection",
    "simfluence": "datafluence.experiments.simfluence",
}
