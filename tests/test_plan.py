"""The rules of SPEC.md section 3, one small test per rule and per odd input.

Every test builds PowerSchool rows and Google accounts in a few lines, makes a plan with
student_sync.plan() and checks what an administrator would see: the change (its action,
labels and the body it sends), the per-student notices, or that nothing changes.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from decimal import Decimal

import pytest

import student_sync as ss
from conftest import make_settings
from testkit import district

# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------

WHS = ss.School(101, "Washington High School", "WHS", False)
LMS = ss.School(102, "Lincoln Middle School", "LMS", False)
ECC = ss.School(901, "Early Childhood Center", "ECC", True)  # in no_grade_ou_schools
GRAD = ss.School(999999, "Graduated Students", "GRAD", True)
SCHOOLS = (WHS, LMS, ECC, GRAD)

ALL = ss.Scope("all", frozenset(s.number for s in SCHOOLS))
ONLY_WHS = ss.Scope("building", frozenset({101}))

WHS_OU = "/D118 Students/WHS Students"
WHS_9TH = WHS_OU + "/9th"
WHS_12TH = WHS_OU + "/12th"
LMS_8TH = "/D118 Students/LMS Students/8th"
SUSPENDED = district.SUSPENDED_OU
GRADUATED = district.GRADUATED_OU
RESTRICTED = WHS_OU + "/Restricted"

CATEGORY, SCHOOL_FIELD, GRAD_FIELD = district.CATEGORY, district.SCHOOL_FIELD, district.GRAD_FIELD

NOVEMBER = dt.date(2026, 11, 28)  # the default run date: no summer grace
JULY = dt.date(2026, 7, 15)

EMAIL = "12345@d118.org"


def row(number=12345, first="Ann", last="Lee", class_of=2030, status=0, school=WHS, grade=9,
        school_id=None) -> ss.StudentRow:
    """One STUDENTS row; SCHOOLID is the school's number unless given."""
    if school_id is None and school is not None:
        school_id = school.number
    return ss.StudentRow(number, first, last, class_of, status, school_id, grade, school)


def attrs(school=101, class_of=2030) -> dict[str, str]:
    fields = {SCHOOL_FIELD: str(school)}
    if class_of is not None:
        fields[GRAD_FIELD] = str(class_of)
    return fields


def account(number=12345, given="Ann", family="Lee", ou=WHS_9TH, suspended=False,
            attributes=None, email=None) -> ss.Account:
    """A Google account; by default the one that matches row() exactly."""
    return ss.Account(email or f"{number}@d118.org", given, family, suspended, ou,
                      attrs() if attributes is None else attributes)


def standard_ous() -> list[str]:
    ous = [SUSPENDED, GRADUATED, RESTRICTED]
    for school in SCHOOLS:
        ous += [f"/D118 Students/{school.abbreviation} Students{g}" for g in district.GRADES.values()]
    return ous


def directory(*accounts: ss.Account, extra_ous=(), without_ous=()) -> ss.Directory:
    """Google as the plan sees it: accounts by lower-cased email, OUs by lower-cased path."""
    dropped = {p.lower() for p in without_ous}
    ous = [p for p in standard_ous() if p.lower() not in dropped] + list(extra_ous)
    return ss.Directory(accounts={a.email.lower(): a for a in accounts},
                        org_units={p.lower(): p for p in ous})


def run_plan(rows, accounts=(), today=NOVEMBER, scope=ALL, settings=None, **directory_options) -> ss.Plan:
    return ss.plan(list(rows), directory(*accounts, **directory_options), settings or make_settings(),
                   today, scope)


def only_change(plan: ss.Plan) -> ss.Change:
    assert len(plan.changes) == 1, plan.changes
    return plan.changes[0]


def only_notice(plan: ss.Plan, level: str, number=12345) -> ss.Notice:
    """The one notice of `level`; it must name the student (as the log and report line does)."""
    found = [n for n in plan.notices if n.level == level]
    assert len(found) == 1, plan.notices
    assert found[0].student_number == str(number)
    return found[0]


def assert_nothing_changes(plan: ss.Plan) -> None:
    assert plan.changes == ()


# ---------------------------------------------------------------------------
# Definitions: email
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("student_number", [12345, 12345.0, Decimal("12345"), "12345"],
                         ids=["int", "float", "Decimal", "text"])
def test_email_is_the_whole_student_number_and_the_suffix(student_number):
    change = only_change(run_plan([row(number=student_number)]))
    assert change.email == EMAIL
    assert change.after["primaryEmail"] == EMAIL


def test_email_matches_google_case_insensitively():
    google = account(email="12345@D118.ORG")
    plan = run_plan([row()], [google])
    assert_nothing_changes(plan)
    assert plan.unchanged == 1


def test_change_to_a_differently_cased_account_names_googles_address():
    google = account(email="12345@D118.org", given="Annie")
    change = only_change(run_plan([row()], [google]))
    assert change.action == "update"
    assert change.email == "12345@D118.org"


# ---------------------------------------------------------------------------
# Definitions: names
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("written, kept", [
    ("O'NEIL", "O'Neil"),
    ("o'neil", "O'Neil"),
    ("SMITH-JONES", "Smith-Jones"),
    ("MCDONALD", "Mcdonald"),
    ("JOHN'S", "John's"),
    ("MARY ANN", "Mary Ann"),
    ("McDonald", "McDonald"),
    ("de la Cruz", "de la Cruz"),
    ("  Mary   Ann  ", "Mary Ann"),
    ("de  la   Cruz ", "de la Cruz"),
    ("ANN\tMARIE", "Ann Marie"),
])
def test_name_normalisation(written, kept):
    assert ss.normalize_name(written) == kept


def test_new_account_gets_normalised_names():
    change = only_change(run_plan([row(first="  MARY   ANN ", last="O'NEIL")]))
    assert change.after["name"] == {"givenName": "Mary Ann", "familyName": "O'Neil"}


# ---------------------------------------------------------------------------
# Definitions: skipped (bad names)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("first, last", [
    ("Test", "Lee"), ("Ann", "TESTER"), ("  teststudent ", "Lee"), ("Ann", " Training1"),
    ("REGISTRATION", "Office"),
])
def test_bad_name_skips_the_student_and_changes_nothing(first, last):
    out_of_step = account(suspended=True, ou=SUSPENDED, given="Someone", attributes={})
    plan = run_plan([row(first=first, last=last)], [out_of_step])
    assert_nothing_changes(plan)
    only_notice(plan, ss.Level.SKIP)
    assert plan.failed_students() == 0


def test_bad_name_without_an_account_creates_nothing():
    plan = run_plan([row(first="Test", last="Student")])
    assert_nothing_changes(plan)
    only_notice(plan, ss.Level.SKIP)


def test_bad_name_compares_with_spaces_collapsed_and_case_ignored():
    settings = make_settings(accounts={"bad_names": ["Test  Student"]})
    plan = run_plan([row(first="TEST   STUDENT ", last="Lee")], settings=settings)
    assert_nothing_changes(plan)
    only_notice(plan, ss.Level.SKIP)


# ---------------------------------------------------------------------------
# Definitions: graduated
# ---------------------------------------------------------------------------

def test_graduated_by_school_name_suspends_into_the_graduated_ou():
    google = account(ou=WHS_12TH)
    change = only_change(run_plan([row(status=0, school=GRAD, grade=99)], [google]))
    assert change.action == "suspend"
    assert change.after == {"suspended": True, "orgUnitPath": GRADUATED}


def test_graduated_school_name_is_case_insensitive_and_trimmed():
    shouting = ss.School(999999, "GRADUATED STUDENTS", "GRAD", True)
    settings = make_settings(accounts={"graduated_school_name": "  graduated students  "})
    change = only_change(run_plan([row(school=shouting, grade=99)], [account(ou=WHS_12TH)],
                                  scope=ss.Scope("all", frozenset({101, 999999})), settings=settings))
    assert change.after == {"suspended": True, "orgUnitPath": GRADUATED}


def test_graduated_school_name_padded_in_powerschool_still_counts():
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE SCHOOLS (SCHOOL_NUMBER, NAME, ABBREVIATION, STATE_EXCLUDEFROMREPORTING)")
    connection.execute("INSERT INTO SCHOOLS VALUES (999999, '  Graduated Students ', 'GRAD', 1)")
    graduated_school = ss.read_schools(connection)[999999]
    change = only_change(run_plan([row(school=graduated_school, grade=99)], [account(ou=WHS_12TH)]))
    assert change.after == {"suspended": True, "orgUnitPath": GRADUATED}


def test_enroll_status_3_is_graduated_at_any_school():
    change = only_change(run_plan([row(status=3, school=WHS, grade=12)], [account(ou=WHS_12TH)]))
    assert change.action == "suspend"
    assert change.after == {"suspended": True, "orgUnitPath": GRADUATED}


def test_no_account_is_created_for_a_graduate():
    plan = run_plan([row(status=3, grade=12)])
    assert_nothing_changes(plan)
    assert plan.notices == ()


# ---------------------------------------------------------------------------
# Definitions: summer grace
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("today", [dt.date(2026, 6, 1), JULY, dt.date(2026, 8, 31)])
def test_summer_grace_keeps_the_account_open_and_moves_it_to_graduated(today):
    google = account(ou=WHS_12TH, attributes=attrs(101, 2026))
    change = only_change(run_plan([row(status=3, class_of=2026, grade=12)], [google], today=today))
    assert change.action == "update"
    assert change.labels == ("move",)
    assert change.after == {"orgUnitPath": GRADUATED}


def test_summer_grace_reopens_a_suspended_graduate():
    google = account(ou=GRADUATED, suspended=True, attributes=attrs(101, 2026))
    change = only_change(run_plan([row(status=3, class_of=2026, grade=12)], [google], today=JULY))
    assert change.labels == ("unsuspend",)
    assert change.after == {"suspended": False}


def test_summer_grace_by_graduated_school_name():
    google = account(ou=WHS_12TH, attributes=attrs(999999, 2026))
    change = only_change(run_plan([row(class_of=2026, school=GRAD, grade=99)], [google], today=JULY))
    assert change.after == {"orgUnitPath": GRADUATED}


@pytest.mark.parametrize("today", [dt.date(2026, 5, 31), dt.date(2026, 9, 1)])
def test_no_summer_grace_outside_june_to_august(today):
    google = account(ou=WHS_12TH, attributes=attrs(101, 2026))
    change = only_change(run_plan([row(status=3, class_of=2026, grade=12)], [google], today=today))
    assert change.after == {"suspended": True, "orgUnitPath": GRADUATED}


def test_no_summer_grace_for_an_earlier_class():
    google = account(ou=WHS_12TH, attributes=attrs(101, 2025))
    change = only_change(run_plan([row(status=3, class_of=2025, grade=12)], [google], today=JULY))
    assert change.after == {"suspended": True, "orgUnitPath": GRADUATED}


def test_no_summer_grace_when_the_setting_is_off():
    settings = make_settings(accounts={"graduated_active_summer": False})
    google = account(ou=WHS_12TH, attributes=attrs(101, 2026))
    change = only_change(run_plan([row(status=3, class_of=2026, grade=12)], [google], today=JULY,
                                  settings=settings))
    assert change.after == {"suspended": True, "orgUnitPath": GRADUATED}


def test_no_summer_grace_without_classof():
    google = account(ou=WHS_12TH, attributes=attrs(101, None))
    plan = run_plan([row(status=3, class_of=None, grade=12)], [google], today=JULY)
    assert only_change(plan).after == {"suspended": True, "orgUnitPath": GRADUATED}
    only_notice(plan, ss.Level.WARNING)


def test_summer_grace_never_creates_an_account():
    plan = run_plan([row(status=3, class_of=2026, grade=12)], today=JULY)
    assert_nothing_changes(plan)
    assert plan.notices == ()


# ---------------------------------------------------------------------------
# Target state: organizational units of active students
# ---------------------------------------------------------------------------

def created_in(plan: ss.Plan) -> str:
    change = only_change(plan)
    assert change.action == "create"
    return change.after["orgUnitPath"]


def test_active_student_goes_to_building_and_grade_ou():
    assert created_in(run_plan([row(grade=9)])) == WHS_9TH


@pytest.mark.parametrize("grade, ou", [("10", WHS_OU + "/10th"), (0, WHS_OU + "/Kindergarten"),
                                       (-1, WHS_OU + "/PreKindergarten"), (9.0, WHS_9TH)])
def test_grade_ou_from_grade_level(grade, ou):
    assert created_in(run_plan([row(grade=grade)])) == ou


def test_grade_mapped_to_empty_text_means_the_building_ou():
    assert created_in(run_plan([row(grade=13)])) == WHS_OU


@pytest.mark.parametrize("status", [-1, "-1", -1.0])
def test_pre_registered_student_is_active_in_the_building_ou(status):
    assert created_in(run_plan([row(status=status, grade=9)])) == WHS_OU


def test_pre_registered_student_needs_no_grade_mapping():
    plan = run_plan([row(status=-1, grade=99)])
    assert created_in(plan) == WHS_OU
    assert plan.notices == ()


def test_no_grade_ou_school_uses_the_building_ou():
    plan = run_plan([row(school=ECC, grade=0)])
    assert created_in(plan) == "/D118 Students/ECC Students"


# ---------------------------------------------------------------------------
# Target state: the table, row by row (an account elsewhere shows where it should be)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("student, today, suspended, ou", [
    (row(status=3, class_of=2026, grade=12), JULY, False, GRADUATED),
    (row(status=3, class_of=2026, grade=12), NOVEMBER, True, GRADUATED),
    (row(status=1), NOVEMBER, True, SUSPENDED),
    (row(status=2), NOVEMBER, True, SUSPENDED),
    (row(status=4), NOVEMBER, True, SUSPENDED),
    (row(status=-2), NOVEMBER, True, SUSPENDED),
    (row(status=-1), NOVEMBER, False, WHS_OU),
    (row(school=ECC, grade=0), NOVEMBER, False, "/D118 Students/ECC Students"),
    (row(status=0), NOVEMBER, False, WHS_9TH),
], ids=["graduated in grace", "graduated", "inactive 1", "transferred 2", "historical 4", "status -2",
        "pre-registered", "no-grade-OU school", "active"])
def test_target_state_table(student, today, suspended, ou):
    google = account(ou=LMS_8TH, attributes=attrs(student.school.number, student.class_of))
    change = only_change(run_plan([student], [google], today=today))
    assert ("suspend" in change.labels) == suspended
    assert change.after["orgUnitPath"] == ou


# ---------------------------------------------------------------------------
# Rule 1: should be active, no account -> create
# ---------------------------------------------------------------------------

def test_rule1_create_sends_everything_in_one_insert():
    change = only_change(run_plan([row()]))
    assert change.action == "create"
    assert change.labels == ("create",)
    assert change.after == {
        "primaryEmail": EMAIL,
        "name": {"givenName": "Ann", "familyName": "Lee"},
        "changePasswordAtNextLogin": True,
        "orgUnitPath": WHS_9TH,
        "customSchemas": {CATEGORY: {SCHOOL_FIELD: "101", GRAD_FIELD: "2030"}},
    }


def test_rule1_password_is_not_in_the_plan():
    change = only_change(run_plan([row()]))
    assert "password" not in change.after
    assert "password" not in repr(change).replace("changePasswordAtNextLogin", "")


def test_rule1_change_password_at_next_login_follows_the_setting():
    settings = make_settings(accounts={"change_password_at_next_login": False})
    change = only_change(run_plan([row()], settings=settings))
    assert change.after["changePasswordAtNextLogin"] is False


# ---------------------------------------------------------------------------
# Rule 2: should be active, account exists -> one update
# ---------------------------------------------------------------------------

def test_rule2_unsuspend_move_rename_and_attributes_in_one_change():
    google = account(given="Annie", suspended=True, ou=SUSPENDED, attributes={})
    change = only_change(run_plan([row()], [google]))
    assert change.action == "update"
    assert set(change.labels) == {"unsuspend", "move", "rename", "attributes"}
    assert change.after == {
        "suspended": False,
        "orgUnitPath": WHS_9TH,
        "name": {"givenName": "Ann", "familyName": "Lee"},
        "customSchemas": {CATEGORY: {SCHOOL_FIELD: "101", GRAD_FIELD: "2030"}},
    }


def test_rule2_unsuspend_only():
    change = only_change(run_plan([row()], [account(suspended=True)]))
    assert change.labels == ("unsuspend",)
    assert change.after == {"suspended": False}


def test_rule2_move_only():
    change = only_change(run_plan([row()], [account(ou=LMS_8TH)]))
    assert change.labels == ("move",)
    assert change.before == {"orgUnitPath": LMS_8TH}
    assert change.after == {"orgUnitPath": WHS_9TH}


@pytest.mark.parametrize("given, family", [("Annie", "Lee"), ("Ann", "Leigh")])
def test_rule2_rename_sends_both_names(given, family):
    change = only_change(run_plan([row()], [account(given=given, family=family)]))
    assert change.labels == ("rename",)
    assert change.after == {"name": {"givenName": "Ann", "familyName": "Lee"}}


def test_rule2_names_differing_only_in_case_change_nothing():
    plan = run_plan([row(first="ANN", last="McDonald")], [account(given="ann", family="MCDONALD")])
    assert_nothing_changes(plan)
    assert plan.unchanged == 1


def test_rule2_missing_attributes_send_both_fields():
    change = only_change(run_plan([row()], [account(attributes={})]))
    assert change.labels == ("attributes",)
    assert change.after == {"customSchemas": {CATEGORY: {SCHOOL_FIELD: "101", GRAD_FIELD: "2030"}}}


def test_rule2_one_missing_attribute_sends_both_fields():
    change = only_change(run_plan([row()], [account(attributes={SCHOOL_FIELD: "101"})]))
    assert change.after == {"customSchemas": {CATEGORY: {SCHOOL_FIELD: "101", GRAD_FIELD: "2030"}}}


def test_rule2_one_differing_attribute_sends_both_fields():
    change = only_change(run_plan([row()], [account(attributes=attrs(101, 2029))]))
    assert change.labels == ("attributes",)
    assert change.after == {"customSchemas": {CATEGORY: {SCHOOL_FIELD: "101", GRAD_FIELD: "2030"}}}


def test_rule2_attributes_compare_as_text():
    student = row(class_of=Decimal("2030"), school_id="101")
    plan = run_plan([student], [account(attributes={SCHOOL_FIELD: "101", GRAD_FIELD: "2030"})])
    assert_nothing_changes(plan)


def test_rule2_float_classof_is_sent_as_whole_number_text():
    change = only_change(run_plan([row(class_of=2030.0)], [account(attributes={})]))
    assert change.after["customSchemas"][CATEGORY][GRAD_FIELD] == "2030"


# ---------------------------------------------------------------------------
# Frozen OUs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("org_unit, frozen", [
    ("/D118 Students/WHS Students/Restricted", True),
    ("/D118 Students/WHS Students/Restricted/9th", True),
    ("/Restricted", True),
    ("/D118 Students/Restrictedfoo", False),
    ("/D118 Students/WHS Students/9th", False),
])
def test_frozen_ou_is_matched_by_whole_path_segments(org_unit, frozen):
    assert ss.is_frozen(org_unit, ["/Restricted", "/Adobe Licensed Students"]) is frozen


@pytest.mark.parametrize("frozen_ou", [RESTRICTED, RESTRICTED + "/9th"])
def test_account_in_frozen_ou_is_not_moved_and_a_warning_names_it(frozen_ou):
    plan = run_plan([row()], [account(ou=frozen_ou)])
    assert_nothing_changes(plan)
    warning = only_notice(plan, ss.Level.WARNING)
    assert frozen_ou in warning.message
    assert plan.failed_students() == 0


def test_account_in_frozen_ou_still_gets_its_other_changes():
    google = account(ou=RESTRICTED, suspended=True, given="Annie", attributes={})
    plan = run_plan([row()], [google])
    change = only_change(plan)
    assert set(change.labels) == {"unsuspend", "rename", "attributes"}
    assert "orgUnitPath" not in change.after
    only_notice(plan, ss.Level.WARNING)


def test_ou_that_only_starts_like_a_frozen_one_is_not_frozen():
    plan = run_plan([row()], [account(ou="/D118 Students/Restrictedfoo")])
    assert only_change(plan).after == {"orgUnitPath": WHS_9TH}
    assert plan.notices == ()


def test_frozen_ou_does_not_protect_a_suspended_student():
    change = only_change(run_plan([row(status=2)], [account(ou=RESTRICTED)]))
    assert change.action == "suspend"
    assert change.after == {"suspended": True, "orgUnitPath": SUSPENDED}


# ---------------------------------------------------------------------------
# Rule 3: should be suspended, account exists
# ---------------------------------------------------------------------------

def test_rule3_suspend_and_move_after_removing_groups():
    change = only_change(run_plan([row(status=2)], [account()]))
    assert change.action == "suspend"
    assert set(change.labels) == {"suspend", "move"}
    assert change.after == {"suspended": True, "orgUnitPath": SUSPENDED}
    assert change.remove_groups is True


def test_rule3_groups_kept_when_the_setting_is_off():
    settings = make_settings(accounts={"remove_groups_on_suspend": False})
    change = only_change(run_plan([row(status=2)], [account()], settings=settings))
    assert change.after == {"suspended": True, "orgUnitPath": SUSPENDED}
    assert change.remove_groups is False


def test_rule3_active_account_already_in_the_suspended_ou_is_suspended():
    change = only_change(run_plan([row(status=2)], [account(ou=SUSPENDED)]))
    assert change.labels == ("suspend",)
    assert change.after == {"suspended": True}
    assert change.remove_groups is True


def test_rule3_already_suspended_in_the_wrong_ou_is_only_moved():
    plan = run_plan([row(status=2)], [account(ou=WHS_9TH, suspended=True)])
    change = only_change(plan)
    assert change.labels == ("move",)
    assert change.after == {"orgUnitPath": SUSPENDED}
    assert change.remove_groups is False
    assert plan.suspensions() == []


def test_rule3_names_and_attributes_are_left_alone():
    google = account(given="Someone", family="Else", attributes={})
    change = only_change(run_plan([row(status=2)], [google]))
    assert set(change.after) == {"suspended", "orgUnitPath"}


# ---------------------------------------------------------------------------
# Rule 4 and rule 5
# ---------------------------------------------------------------------------

def test_rule4_suspended_student_without_account_changes_nothing():
    plan = run_plan([row(status=2)])
    assert_nothing_changes(plan)
    assert plan.notices == ()


@pytest.mark.parametrize("student, google", [
    (row(), account()),
    (row(status=2), account(ou=SUSPENDED, suspended=True)),
    (row(status=3, grade=12), account(ou=GRADUATED, suspended=True)),
], ids=["active", "withdrawn", "graduated"])
def test_rule5_matching_account_is_counted_unchanged(student, google):
    plan = run_plan([student], [google])
    assert_nothing_changes(plan)
    assert plan.unchanged == 1
    assert plan.notices == ()


# ---------------------------------------------------------------------------
# Errors: the student fails and nothing about them changes
# ---------------------------------------------------------------------------

def test_null_student_number_is_an_error_naming_the_student():
    plan = run_plan([row(number=None)])
    assert_nothing_changes(plan)
    error = only_notice(plan, ss.Level.ERROR, number="(none)")
    assert "Ann Lee" in error.message
    assert "STUDENT_NUMBER" in error.message
    assert plan.failed_students() == 1


def test_non_numeric_student_number_is_an_error():
    plan = run_plan([row(number="12A45")])
    assert_nothing_changes(plan)
    error = only_notice(plan, ss.Level.ERROR, number="12A45")
    assert "STUDENT_NUMBER" in error.message


@pytest.mark.parametrize("status", [None, "A", 1.5, "1.5", Decimal("1.5")])
def test_bad_enroll_status_is_an_error_and_nothing_changes(status):
    out_of_step = account(ou=LMS_8TH, given="Annie")
    plan = run_plan([row(status=status)], [out_of_step])
    assert_nothing_changes(plan)
    error = only_notice(plan, ss.Level.ERROR)
    assert "ENROLL_STATUS" in error.message
    assert plan.failed_students() == 1


def test_bad_enroll_status_in_another_schools_row_is_an_error():
    rows = [row(school=WHS), row(school=LMS, grade=8, status=None)]
    plan = run_plan(rows, [account(ou=LMS_8TH)], scope=ONLY_WHS)
    assert_nothing_changes(plan)
    assert "ENROLL_STATUS" in only_notice(plan, ss.Level.ERROR).message


@pytest.mark.parametrize("school_id", [None, "WHS"], ids=["NULL", "text"])
def test_bad_schoolid_in_any_row_is_an_error(school_id):
    rows = [row(school=WHS), row(school=None, school_id=school_id)]
    plan = run_plan(rows, [account(ou=LMS_8TH)])
    assert_nothing_changes(plan)
    assert "SCHOOLID" in only_notice(plan, ss.Level.ERROR).message


@pytest.mark.parametrize("first, last", [("", "Lee"), ("   ", "Lee"), (None, "Lee"), ("Ann", ""),
                                         ("A" * 61, "Lee"), ("Ann", "L" * 61)])
def test_bad_name_for_a_new_account_is_an_error(first, last):
    plan = run_plan([row(first=first, last=last)])
    assert_nothing_changes(plan)
    only_notice(plan, ss.Level.ERROR)
    assert plan.failed_students() == 1


def test_sixty_character_name_is_accepted_for_a_new_account():
    change = only_change(run_plan([row(first="A" * 60)]))
    assert change.after["name"]["givenName"] == "A" + "a" * 59


@pytest.mark.parametrize("grade", [14, 99, None, "K"])
def test_active_student_with_unmapped_grade_is_an_error(grade):
    plan = run_plan([row(grade=grade)], [account(ou=LMS_8TH)])
    assert_nothing_changes(plan)
    assert "grade" in only_notice(plan, ss.Level.ERROR).message


@pytest.mark.parametrize("status, ou", [(2, SUSPENDED), (3, GRADUATED)], ids=["withdrawn", "graduated"])
def test_unmapped_grade_is_fine_for_a_student_to_suspend(status, ou):
    plan = run_plan([row(status=status, grade=99)], [account()])
    assert only_change(plan).after == {"suspended": True, "orgUnitPath": ou}
    assert plan.notices == ()


def test_missing_target_ou_stops_a_create():
    plan = run_plan([row()], without_ous=[WHS_9TH])
    assert_nothing_changes(plan)
    assert WHS_9TH in only_notice(plan, ss.Level.ERROR).message


def test_missing_target_ou_stops_the_whole_update():
    plan = run_plan([row()], [account(ou=LMS_8TH, given="Annie")], without_ous=[WHS_9TH])
    assert_nothing_changes(plan)
    assert WHS_9TH in only_notice(plan, ss.Level.ERROR).message
    assert plan.failed_students() == 1


def test_missing_suspended_ou_stops_a_suspension():
    plan = run_plan([row(status=2)], [account()], without_ous=[SUSPENDED])
    assert_nothing_changes(plan)
    assert SUSPENDED in only_notice(plan, ss.Level.ERROR).message


def test_missing_target_ou_does_not_matter_when_nothing_sends_it():
    plan = run_plan([row()], [account(given="Annie")], without_ous=[WHS_9TH])
    assert only_change(plan).labels == ("rename",)
    assert plan.notices == ()


def test_missing_target_ou_does_not_matter_for_an_account_left_in_a_frozen_ou():
    plan = run_plan([row()], [account(ou=RESTRICTED, given="Annie")], without_ous=[WHS_9TH])
    assert only_change(plan).labels == ("rename",)
    only_notice(plan, ss.Level.WARNING)
    assert plan.failed_students() == 0


def test_ou_paths_compare_case_insensitively():
    google_spelling = WHS_OU + "/9TH"
    plan = run_plan([row()], [account(ou="/d118 students/whs students/9th")],
                    without_ous=[WHS_9TH], extra_ous=[google_spelling])
    assert_nothing_changes(plan)
    assert plan.notices == ()


def test_move_sends_googles_spelling_of_the_ou():
    google_spelling = WHS_OU + "/9TH"
    plan = run_plan([row()], [account(ou=LMS_8TH)], without_ous=[WHS_9TH], extra_ous=[google_spelling])
    assert only_change(plan).after == {"orgUnitPath": google_spelling}


def test_create_sends_googles_spelling_of_the_ou():
    google_spelling = WHS_OU + "/9TH"
    plan = run_plan([row()], without_ous=[WHS_9TH], extra_ous=[google_spelling])
    assert created_in(plan) == google_spelling


# ---------------------------------------------------------------------------
# Warnings: the decision is made and applied
# ---------------------------------------------------------------------------

def test_duplicate_rows_active_row_beats_suspended_one():
    rows = [row(school=WHS, status=2), row(school=LMS, grade=8, status=0)]
    plan = run_plan(rows, [account(ou=WHS_9TH, attributes=attrs(102))])
    change = only_change(plan)
    assert change.action == "update"
    assert change.after == {"orgUnitPath": LMS_8TH}
    only_notice(plan, ss.Level.WARNING)
    assert plan.failed_students() == 0


def test_duplicate_rows_tie_goes_to_the_lowest_school_number():
    rows = [row(school=LMS, grade=8), row(school=WHS, grade=9)]
    plan = run_plan(rows, [account(ou=LMS_8TH)])
    assert only_change(plan).after == {"orgUnitPath": WHS_9TH}
    only_notice(plan, ss.Level.WARNING)


def test_duplicate_rows_bad_name_rows_are_dropped_first():
    rows = [row(first="Test", last="Student", school=WHS, grade=9), row(school=LMS, grade=8)]
    plan = run_plan(rows)
    change = only_change(plan)
    assert change.after["orgUnitPath"] == LMS_8TH
    assert change.after["name"] == {"givenName": "Ann", "familyName": "Lee"}


def test_duplicate_rows_with_differently_written_student_numbers_are_one_student():
    rows = [row(number=12345, school=LMS, grade=8), row(number="12345", school=WHS), row(number=12345.0, status=2)]
    plan = run_plan(rows)
    assert only_change(plan).after["orgUnitPath"] == WHS_9TH
    only_notice(plan, ss.Level.WARNING)


def test_scoped_run_never_suspends_a_student_active_elsewhere():
    rows = [row(school=WHS, status=2), row(school=LMS, grade=8, status=0)]
    plan = run_plan(rows, [account(ou=LMS_8TH, attributes=attrs(102))], scope=ONLY_WHS)
    assert_nothing_changes(plan)
    assert plan.suspensions() == []


def test_scoped_run_may_reactivate_a_student_active_elsewhere():
    rows = [row(school=WHS, status=2), row(school=LMS, grade=8, status=0)]
    google = account(ou=SUSPENDED, suspended=True, attributes=attrs(102))
    change = only_change(run_plan(rows, [google], scope=ONLY_WHS))
    assert set(change.labels) == {"unsuspend", "move"}
    assert change.after == {"suspended": False, "orgUnitPath": LMS_8TH}


def test_student_with_no_row_in_scope_is_not_touched():
    plan = run_plan([row(school=LMS, grade=8, status=2)], [account(ou=LMS_8TH)], scope=ONLY_WHS)
    assert_nothing_changes(plan)
    assert plan.notices == ()


def test_null_classof_leaves_grad_year_out_of_a_new_account_with_a_warning():
    plan = run_plan([row(class_of=None)])
    assert only_change(plan).after["customSchemas"] == {CATEGORY: {SCHOOL_FIELD: "101"}}
    only_notice(plan, ss.Level.WARNING)
    assert plan.failed_students() == 0


def test_null_classof_does_not_compare_the_grad_year():
    plan = run_plan([row(class_of=None)], [account(attributes=attrs(101, 2029))])
    assert_nothing_changes(plan)
    only_notice(plan, ss.Level.WARNING)
    assert plan.failed_students() == 0


@pytest.mark.parametrize("first, last", [("", "Lee"), ("Ann", "L" * 61)], ids=["empty", "too long"])
def test_name_kept_in_google_with_a_warning_and_other_changes_still_go(first, last):
    plan = run_plan([row(first=first, last=last)], [account(ou=LMS_8TH)])
    change = only_change(plan)
    assert change.labels == ("move",)
    assert "name" not in change.after
    only_notice(plan, ss.Level.WARNING)
    assert plan.failed_students() == 0


def test_a_bad_name_keeps_googles_and_the_other_name_is_still_renamed():
    plan = run_plan([row(first="", last="Leigh")], [account(given="Ann", family="Lee")])
    change = only_change(plan)
    assert change.labels == ("rename",)
    assert change.after["name"] == {"givenName": "Ann", "familyName": "Leigh"}
    assert "first name" in only_notice(plan, ss.Level.WARNING).message


# ---------------------------------------------------------------------------
# Scope and accounts that are not ours
# ---------------------------------------------------------------------------

def test_student_whose_school_has_no_schools_row_is_out_of_every_scope():
    plan = run_plan([row(school=None, school_id=555)], [account(ou=LMS_8TH, suspended=True)])
    assert_nothing_changes(plan)
    assert plan.notices == ()


def test_accounts_matching_no_student_are_never_touched():
    strangers = [account(number=99999, ou=LMS_8TH, suspended=True),
                 account(email="teacher@d118.org", ou="/Staff")]
    plan = run_plan([row()], [account(), *strangers])
    assert_nothing_changes(plan)
    assert plan.unchanged == 1


def test_plan_is_deterministic():
    rows = [row(), row(number=2, status=2), row(number=3, school=LMS, grade=8),
            row(number=4, first="Test"), row(number=5, status=None),
            row(number=6, school=WHS, status=2), row(number=6, school=LMS, grade=8)]
    accounts = [account(number=2), account(number=6, ou=SUSPENDED, suspended=True)]
    assert run_plan(rows, accounts) == run_plan(rows, accounts)


def test_row_order_does_not_change_the_plan():
    rows = [row(), row(number=2, status=2), row(number=3, school=LMS, grade=8),
            row(number=6, school=WHS, status=2), row(number=6, school=LMS, grade=8),
            row(number=7, school=LMS, grade=8), row(number=7, school=WHS)]
    accounts = [account(number=2), account(number=6, ou=SUSPENDED, suspended=True)]
    forward, backward = run_plan(rows, accounts), run_plan(reversed(rows), accounts)
    assert forward.changes == backward.changes
    assert forward.decisions == backward.decisions
