from bertjax.bench.driver import run

run()
