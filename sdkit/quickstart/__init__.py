"""The offline demo's miniature pieces: tiny random models, the digits data and judge, `sdkit quickstart`."""
