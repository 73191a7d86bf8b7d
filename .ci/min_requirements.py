"""Print pyproject.toml's dependencies pinned at their floors (`name>=1.2,<2` -> `name==1.2`),
markers kept, for the CI job that proves the declared minimum versions work together.

Usage: python3 .ci/min_requirements.py [extra ...] > min.txt && pip install -r min.txt
"""
import re
import sys
from pathlib import Path

import tomllib

FLOOR = re.compile(r'^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$')


def pinned(requirement: str) -> str:
    name, extras, specifiers, marker = FLOOR.match(requirement).groups()
    floors = [s.strip()[2:] for s in specifiers.split(',') if s.strip().startswith('>=')]
    if len(floors) != 1:
        sys.exit(f'{requirement!r}: every dependency needs one `>=` floor for this job')
    return f'{name}{extras or ""}=={floors[0]}{marker or ""}'


def main(extras: list) -> None:
    project = tomllib.loads((Path(__file__).parents[1] / 'pyproject.toml').read_text())['project']
    requirements = list(project['dependencies'])
    for extra in extras:
        requirements += [r for r in project['optional-dependencies'][extra]
                         if not r.startswith(project['name'])]
    print('\n'.join(pinned(r) for r in requirements))


if __name__ == '__main__':
    main(sys.argv[1:])
