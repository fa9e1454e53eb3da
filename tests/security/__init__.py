"""Security tests: key custody, compose secrets, and the other holes of "Evidence you can trust"."""
