"""The test Spark session runs with the Arrow settings the product's profiles give the jobs."""

from tests.spark_profile import PROFILES, arrow_settings


def test_the_test_session_sets_the_local_profiles_arrow_settings(spark):
    wanted = arrow_settings("local")
    assert wanted, "conf/spark/local.conf sets no spark.sql.execution.arrow.* key: nothing to compare"
    assert {key: spark.conf.get(key) for key in wanted} == wanted
    # Set as spark-submit sets a profile's keys, not left to Spark's defaults (which change between releases).
    conf = spark.sparkContext.getConf()
    assert {key: conf.get(key) for key in wanted} == wanted


def test_every_profile_has_the_same_arrow_settings():
    # The tests run with the local profile's; a profile that differed would run untested settings.
    for profile in sorted(p.stem for p in PROFILES.glob("*.conf")):
        assert arrow_settings(profile) == arrow_settings("local"), profile
