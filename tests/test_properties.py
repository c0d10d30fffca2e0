"""Properties of student_sync.plan() over random districts (SPEC.md section 3).

Hypothesis builds PowerSchool rows (duplicate student numbers, odd statuses, grades and
names, rows of unknown schools), a Google directory (the district's students, teachers,
out-of-scope students, frozen OUs, missing OUs), a run date and a scope, and checks what
must hold for every plan:

1. the plan is a pure function of its inputs: same inputs, same plan, whatever the row order;
2. it never touches an account outside the scope, nor any account that is not a student's;
3. it converges: applied to a simulated Google, the next plan has nothing left to do;
4. it is safe: no account created for a graduate or an inactive student, no move out of a
   frozen OU except to suspend, no OU sent that Google does not have, and every suspension
   really takes an active account to suspended.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import random
from collections import Counter
from types import MappingProxyType
from typing import Any, Mapping

from hypothesis import HealthCheck, example, given, settings, strategies as st

import student_sync as ss
from conftest import make_settings
from testkit import district

# ---------------------------------------------------------------------------
# The district
# ---------------------------------------------------------------------------

WHS = ss.School(101, "Washington High School", "WHS", False)
LMS = ss.School(102, "Lincoln Middle School", "LMS", False)
ANNEX = ss.School(103, "Annex", "", False)                        # no ABBREVIATION: no building OU
ECC = ss.School(901, "Early Childhood Center", "ECC", True)        # in no_grade_ou_schools
ALUMNI = ss.School(990, "GRADUATED STUDENTS", "ALUM", True)        # graduated by name, any case
GRAD = ss.School(999999, "Graduated Students", "GRAD", True)       # graduated, and no_grade
SCHOOLS = (WHS, LMS, ANNEX, ECC, ALUMNI, GRAD)
SCHOOL_NUMBERS = tuple(s.number for s in SCHOOLS)

CATEGORY, SCHOOL_FIELD, GRAD_FIELD = district.CATEGORY, district.SCHOOL_FIELD, district.GRAD_FIELD
SUFFIX = district.SUFFIX
SUSPENDED_OU, GRADUATED_OU = district.SUSPENDED_OU, district.GRADUATED_OU
GRADUATED_NAME = "graduated students"
BAD_NAMES = {"test", "tester", "teststudent", "training1", "registration"}
FROZEN = ("/Restricted", "/Adobe Licensed Students")

WHS_9TH, LMS_7TH = "/D118 Students/WHS Students/9th", "/D118 Students/LMS Students/7th"
RESTRICTED = "/D118 Students/WHS Students/Restricted"
FROZEN_OUS = [
    RESTRICTED,
    RESTRICTED + "/9th",
    "/D118 Students/Adobe Licensed Students",
    "/D118 Students/LMS Students/Adobe Licensed Students/7th",
]
OTHER_OUS = ["/", "/Staff", "/Staff/Teachers", "/D118 Students/Restrictedfoo",
             "/D118 Students/WHS Students/Restricted Lab"]


def building_ous(abbreviation: str) -> list[str]:
    building = f"{district.PREFIX}{abbreviation} Students"
    return [building + grade for grade in sorted(set(district.GRADES.values()))]


# Every OU a run could target or an account could sit in.
STUDENT_OUS = [ou for s in SCHOOLS if s.abbreviation for ou in building_ous(s.abbreviation)]
ALL_OUS = [SUSPENDED_OU, GRADUATED_OU, *STUDENT_OUS, *FROZEN_OUS, *OTHER_OUS]


SETTINGS = {(summer, groups): make_settings(accounts={"graduated_active_summer": summer,
                                                      "remove_groups_on_suspend": groups},
                                            ous={"frozen": list(FROZEN)})
            for summer in (True, False) for groups in (True, False)}

# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

POOL = tuple(range(1001, 1011))  # small, so that one student often has several rows


@st.composite
def mostly(draw, usual: st.SearchStrategy, odd: st.SearchStrategy) -> Any:
    """Usual values five times in six, so that plenty of students get past the checks."""
    return draw(odd) if draw(st.integers(0, 5)) == 5 else draw(usual)


# How PowerSchool may hand a student number back (all mean the same student), and bad ones
# (padded text is bad data: issue 10.7).
student_numbers = mostly(
    st.sampled_from(POOL),
    st.one_of(st.sampled_from(POOL).map(str), st.sampled_from(POOL).map(float),
              st.sampled_from(POOL).map(lambda n: f"  {n} "),
              st.sampled_from([None, "", "abc", 0, -4, 1001.5])),
)
statuses = mostly(st.sampled_from([0, 3, -1, 1, 2]), st.sampled_from([-2, 4, None, "x", "0"]))
grades = mostly(st.integers(0, 12), st.sampled_from([-3, -2, -1, 13, 14, 99, None, "9", "x", ""]))
class_ofs = mostly(st.sampled_from([2026, 2025, 2027, 2030]), st.sampled_from([None, "2026", "x"]))
names = mostly(
    st.sampled_from(["Ann", "Lee", "Mary Ann", "O'NEIL", "o'neil", "SMITH-JONES", "McDonald",
                     "de la Cruz", "  Mary   Ann ", "ANN", "lee", "JOHN'S", "Zoë"]),
    st.one_of(st.sampled_from(["Test", " test ", "TESTER", "Registration", "", "   ", None,
                               "A" * 61, "b" * 70, "a" * 60]),
              st.text(alphabet="aAbB '-", max_size=8)),
)
# A row's school, or no SCHOOLS row at all (then SCHOOLID names an unknown school, or is bad).
row_schools = mostly(st.sampled_from([WHS, WHS, LMS, ECC, GRAD]),
                     st.sampled_from([None, None, ANNEX, ALUMNI]))


@st.composite
def student_rows(draw) -> ss.StudentRow:
    school = draw(row_schools)
    if school is not None:
        school_id = draw(mostly(st.just(school.number), st.sampled_from([str(school.number),
                                                                         float(school.number)])))
    else:
        school_id = draw(st.sampled_from([555, "777", None, "x", ""]))
    return ss.StudentRow(draw(student_numbers), draw(names), draw(names), draw(class_ofs),
                         draw(statuses), school_id, draw(grades), school)


attribute_sets = st.one_of(
    st.just({}),
    st.fixed_dictionaries({SCHOOL_FIELD: st.sampled_from(["101", "102", "901", "999999", "1"])}),
    st.fixed_dictionaries({SCHOOL_FIELD: st.sampled_from(["101", "102", "999999"]),
                           GRAD_FIELD: st.sampled_from(["2026", "2027", "2030", "2026.0"])}),
    st.fixed_dictionaries({GRAD_FIELD: st.just("2027"), "Other_Field": st.just("x")}),
)
# Where accounts usually sit: the OUs the rules target most, and the frozen ones.
LIKELY_OUS = [SUSPENDED_OU, GRADUATED_OU, WHS_9TH, LMS_7TH, "/D118 Students/ECC Students", *FROZEN_OUS]


@st.composite
def accounts(draw, email: str) -> ss.Account:
    org_unit = draw(mostly(st.sampled_from(LIKELY_OUS), st.sampled_from(ALL_OUS)))
    if draw(st.booleans()):
        org_unit = org_unit.lower()  # Google's OU compared case-insensitively
    return ss.Account(email, draw(names.map(lambda n: n if isinstance(n, str) else "")),
                      draw(names.map(lambda n: n if isinstance(n, str) else "")),
                      draw(st.booleans()), org_unit, MappingProxyType(draw(attribute_sets)))


# Accounts that are nobody's in this district: staff, a leading zero, a student not in PowerSchool.
UNRELATED = ["jsmith@d118.org", "Teacher.One@d118.org", "01001@d118.org", "1001x@d118.org",
             "9999@d118.org", "admin@d118.org"]


SCOPE_ALL = ss.Scope("all", frozenset(SCHOOL_NUMBERS))
scopes = st.one_of(
    st.just(SCOPE_ALL),
    st.sets(st.sampled_from(SCHOOL_NUMBERS), min_size=1).map(lambda n: ss.Scope("building", frozenset(n))),
)
# Summer 2026 (grace for the class of 2026), its edges, and any other day.
run_dates = st.one_of(st.dates(dt.date(2026, 6, 1), dt.date(2026, 8, 31)),
                      st.sampled_from([dt.date(2026, 5, 31), dt.date(2026, 9, 1), dt.date(2025, 7, 1)]),
                      st.dates(dt.date(2024, 1, 1), dt.date(2028, 12, 31)))


@dataclasses.dataclass(frozen=True)
class District:
    """One random case: PowerSchool rows, Google's accounts and OUs, run date and scope."""

    rows: tuple[ss.StudentRow, ...]
    accounts: tuple[ss.Account, ...]
    missing_ous: frozenset[str]           # OUs of ALL_OUS that Google does not have
    summer_grace: bool                    # accounts.graduated_active_summer
    remove_groups: bool                   # accounts.remove_groups_on_suspend
    today: dt.date
    scope: ss.Scope

    @property
    def directory(self) -> ss.Directory:
        return ss.Directory(
            accounts=MappingProxyType({a.email.lower(): a for a in self.accounts}),
            org_units=MappingProxyType({ou.lower(): ou for ou in ALL_OUS if ou not in self.missing_ous}))

    @property
    def settings(self) -> ss.Settings:
        return SETTINGS[self.summer_grace, self.remove_groups]

    def __repr__(self) -> str:  # short enough to read in a falsifying example
        lines = ["District("]
        lines += [f"  row {r!r}" for r in self.rows]
        lines += [f"  account {a!r}" for a in self.accounts]
        lines += [f"  missing OUs {sorted(self.missing_ous)}",
                  f"  summer_grace={self.summer_grace} remove_groups={self.remove_groups}",
                  f"  today={self.today} scope={self.scope})"]
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints it
        printer.text(repr(self))


@st.composite
def districts(draw) -> District:
    found: dict[str, ss.Account] = {}
    for number in draw(st.lists(st.sampled_from(POOL), unique=True, max_size=len(POOL))):
        email = draw(st.sampled_from([f"{number}{SUFFIX}", f"{number}@D118.ORG", f"{number}@D118.org"]))
        found[email.lower()] = draw(accounts(email))
    for email in draw(st.lists(st.sampled_from(UNRELATED), unique=True, max_size=3)):
        found[email.lower()] = draw(accounts(email))
    # The OU set sometimes lacks a building, a grade, or the suspended / graduated OUs.
    missing = set(draw(st.lists(st.sampled_from([SUSPENDED_OU, GRADUATED_OU, *STUDENT_OUS]), max_size=4)))
    if draw(st.booleans()):
        missing |= set(building_ous(draw(st.sampled_from(["WHS", "LMS", "ECC"]))))
    return District(
        rows=tuple(draw(st.lists(student_rows(), max_size=14))),
        accounts=tuple(found.values()),
        missing_ous=frozenset(missing),
        summer_grace=draw(mostly(st.just(True), st.just(False))),
        remove_groups=draw(st.booleans()),
        today=draw(run_dates),
        scope=draw(scopes),
    )


def case_of(*rows: ss.StudentRow, accounts: tuple[ss.Account, ...] = (), missing_ous=(),
            today: dt.date = dt.date(2026, 11, 28), scope: ss.Scope | None = None) -> District:
    """A hand-written case for @example: the odd inputs that matter most, tried on every run."""
    return District(rows=rows, accounts=accounts, missing_ous=frozenset(missing_ous), summer_grace=True,
                    remove_groups=True, today=today, scope=scope or SCOPE_ALL)


def run(case: District, rows=None, directory: ss.Directory | None = None) -> ss.Plan:
    return ss.plan(list(case.rows if rows is None else rows), directory or case.directory,
                   case.settings, case.today, case.scope)


# STUDENT_SYNC_EXAMPLES=5000 for a longer hunt; 200 keeps this file at a few seconds.
PROPERTY = settings(max_examples=int(os.environ.get("STUDENT_SYNC_EXAMPLES", "200")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------
# The spec, read independently of student_sync (oracles)
# ---------------------------------------------------------------------------


def number_of(value: Any) -> int | None:
    """The student number a STUDENT_NUMBER value stands for; None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None
    elif isinstance(value, str):  # digits only (issue 10.7): "  1003 " is bad data, not 1003
        value = int(value) if value.isascii() and value.isdigit() else None
    return value if isinstance(value, int) and value > 0 else None


def email_of(number: int) -> str:
    return f"{number}{SUFFIX}"


def spec_frozen(org_unit: str) -> bool:
    """SPEC: frozen when one of ous.frozen appears in the path as whole path segments."""
    segments = [s.lower() for s in org_unit.split("/") if s]
    for path in FROZEN:
        wanted = [s.lower() for s in path.split("/") if s]
        if any(segments[i:i + len(wanted)] == wanted for i in range(len(segments) - len(wanted) + 1)):
            return True
    return False


def clean(value: Any) -> str:
    return "" if value is None else " ".join(str(value).split())


def rows_of(rows: list[ss.StudentRow], email: str) -> list[ss.StudentRow]:
    return [r for r in rows if (n := number_of(r.student_number)) and email_of(n) == email.lower()]


def in_scope_emails(rows: list[ss.StudentRow], scope: ss.Scope) -> set[str]:
    """Emails of students with at least one row of a known school in the scope."""
    return {email_of(n) for r in rows
            if (n := number_of(r.student_number)) and r.school is not None
            and r.school.number in scope.school_numbers}


def status_of(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def row_is_active_non_graduate(row: ss.StudentRow) -> bool:
    """SPEC: active = ENROLL_STATUS 0 or -1 and not graduated (status 3 or the graduated school)."""
    return (row.school is not None and status_of(row.enroll_status) in (0, -1)
            and row.school.name.strip().lower() != GRADUATED_NAME)


def is_kept(row: ss.StudentRow) -> bool:
    """Not skipped for a bad (test or placeholder) name."""
    return clean(row.first_name).lower() not in BAD_NAMES and clean(row.last_name).lower() not in BAD_NAMES


# ---------------------------------------------------------------------------
# A simulated Google
# ---------------------------------------------------------------------------


def _patched(account: ss.Account, body: dict[str, Any]) -> ss.Account:
    """users.update: absent fields kept, name sub-fields replaced, customSchemas merged per field."""
    name = body.get("name") or {}
    attributes = dict(account.attributes)
    for key, value in ((body.get("customSchemas") or {}).get(CATEGORY) or {}).items():
        if value is None:
            attributes.pop(key, None)  # null clears
        else:
            attributes[key] = str(value)
    return ss.Account(
        email=account.email,
        given_name=name.get("givenName", account.given_name),
        family_name=name.get("familyName", account.family_name),
        suspended=body.get("suspended", account.suspended),
        org_unit=body.get("orgUnitPath", account.org_unit),
        attributes=MappingProxyType(attributes),
    )


def apply_to_snapshot(directory: ss.Directory, plan: ss.Plan, password_ok: bool = True) -> ss.Directory:
    """The directory Google would hold after every change of `plan` is applied.

    create: a new account with the body's fields (not suspended unless the body says so);
    update and suspend: patch semantics; group removal changes nothing the plan reads.
    With `password_ok` false, Google refuses every insert (no usable new-account password)
    and the other changes still go through.
    """
    found = dict(directory.accounts)
    for change in plan.changes:
        key = change.email.lower()
        body = dict(change.after)
        if change.action == "create":
            assert key not in found, f"create for an existing account {change.email}"
            if not password_ok:
                continue
            blank = ss.Account(body["primaryEmail"], "", "", False, "/", MappingProxyType({}))
            found[key] = _patched(blank, body)
        else:
            assert key in found, f"{change.action} for a missing account {change.email}"
            found[key] = _patched(found[key], body)
    return ss.Directory(accounts=MappingProxyType(found), org_units=directory.org_units)


# ---------------------------------------------------------------------------
# 1. Deterministic
# ---------------------------------------------------------------------------


def _comparable(plan_: ss.Plan) -> tuple:
    """A plan with the order of its notices left out (bad student numbers come in row order)."""
    return list(map(repr, plan_.changes)), Counter(plan_.notices), dict(plan_.decisions), plan_.unchanged


def _orders(rows: tuple[ss.StudentRow, ...], seed: int) -> list[list[ss.StudentRow]]:
    """The rows reversed and shuffled: PowerSchool's query has no ORDER BY."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return [list(reversed(rows)), shuffled]


@PROPERTY
# Found by this property before rows were weighed in a fixed order: with two rows at one
# school the first row won (9th or 10th grade by query order), and the several-rows warning
# listed the schools in row order.
@example(case=case_of(ss.StudentRow(1003, "Ann", "Lee", 2030, 0, 101, 9, WHS),
                       ss.StudentRow(1003, "Ann", "Lee", 2030, 0, 101, 10, WHS)), seed=0)
@example(case=case_of(ss.StudentRow(1001, "Ann", "Lee", 2030, 0, 101, 9, WHS),
                       ss.StudentRow(1001, "Ann", "Lee", 2030, 0, 102, 8, LMS)), seed=0)
@given(case=districts(), seed=st.integers(0, 2**32))
def test_plan_is_deterministic_and_ignores_row_order(case, seed):
    rows, found = list(case.rows), dict(case.directory.accounts)
    first = run(case)
    again = run(case)
    assert (again.changes, again.notices, dict(again.decisions), again.unchanged) == (
        first.changes, first.notices, dict(first.decisions), first.unchanged)
    for order in _orders(case.rows, seed):
        assert _comparable(run(case, rows=order)) == _comparable(first)
    assert list(case.rows) == rows and dict(case.directory.accounts) == found  # inputs untouched


# ---------------------------------------------------------------------------
# 2. Scope
# ---------------------------------------------------------------------------


@PROPERTY
# A WHS run: a student active at LMS only, one with a row at each school, a teacher.
@example(case=case_of(ss.StudentRow(1001, "Ann", "Lee", 2030, 0, 102, 7, LMS),
                      ss.StudentRow(1002, "Bo", "Li", 2030, 2, 101, 9, WHS),
                      ss.StudentRow(1002, "Bo", "Li", 2030, 0, 102, 7, LMS),
                      accounts=(ss.Account("1001@d118.org", "Ann", "X", True, WHS_9TH, {}),
                                ss.Account("1002@D118.org", "Bo", "Li", True, WHS_9TH, {}),
                                ss.Account("jsmith@d118.org", "J", "Smith", False, "/Staff", {})),
                      scope=ss.Scope("building", frozenset({101}))))
@given(case=districts())
def test_changes_touch_only_students_in_scope(case):
    plan_ = run(case)
    allowed = in_scope_emails(case.rows, case.scope)
    for change in plan_.changes:
        assert change.email.lower() in allowed, change
        # The changed account is the student's own: int(STUDENT_NUMBER) + suffix, never staff.
        assert change.email.lower() == email_of(change.student_number), change
        assert change.email.lower() not in {e.lower() for e in UNRELATED}, change
    assert set(plan_.decisions) <= allowed


# ---------------------------------------------------------------------------
# 3. Convergence
# ---------------------------------------------------------------------------


@PROPERTY
@given(case=districts())
def test_a_second_run_after_applying_the_plan_changes_nothing(case):
    first = run(case)
    second = run(case, directory=apply_to_snapshot(case.directory, first))
    assert second.changes == (), second.changes
    assert second.failed_students() <= first.failed_students()
    # Google refused every insert: the next run plans exactly those creates again.
    refused = run(case, directory=apply_to_snapshot(case.directory, first, password_ok=False))
    assert refused.changes == tuple(c for c in first.changes if c.action == "create")


# ---------------------------------------------------------------------------
# 4. Safety
# ---------------------------------------------------------------------------


def check_create_only_for_active_non_graduates(case: District, plan_: ss.Plan, change: ss.Change) -> None:
    assert change.email.lower() not in case.directory.accounts
    decision = plan_.decisions[change.email.lower()]
    assert decision.should_be_active and not decision.graduated
    rows = [r for r in rows_of(case.rows, change.email) if is_kept(r) and r.school is not None]
    # Every weighed row could be weighed, and the winning row (should-be-active first, then
    # the lowest school number) is active and not graduated.
    assert all(status_of(r.enroll_status) is not None for r in rows), rows
    active = [r for r in rows if row_is_active_non_graduate(r)]
    assert active, rows
    assert decision.school_number == min(r.school.number for r in active)
    assert change.after.get("suspended", False) is False
    name = change.after["name"]
    assert 0 < len(name["givenName"]) <= 60 and 0 < len(name["familyName"]) <= 60, name


def check_frozen_ou_holds(account: ss.Account | None, change: ss.Change) -> None:
    if account is not None and "orgUnitPath" in change.after and spec_frozen(account.org_unit):
        assert change.action == "suspend", change
        assert change.after.get("suspended", account.suspended) is True, change


def check_ous_exist(org_units: Mapping[str, str], change: ss.Change) -> None:
    if "orgUnitPath" in change.after:
        org_unit = change.after["orgUnitPath"]
        assert isinstance(org_unit, str) and org_unit.lower() in org_units, change


def check_suspension(account: ss.Account | None, plan_: ss.Plan, change: ss.Change) -> None:
    if "suspend" in change.labels:
        assert change.action == "suspend", change
        assert change.after.get("suspended") is True, change
        assert account is not None and account.suspended is False, change
    if change.action == "suspend":
        assert not plan_.decisions[change.email.lower()].should_be_active, change
        assert set(change.after) <= {"suspended", "orgUnitPath"}, change  # names, attributes alone
    if change.after.get("suspended") is True:
        assert "suspend" in change.labels, change


@PROPERTY
# A graduate in summer grace without an account (status 3; the graduated school).
@example(case=case_of(ss.StudentRow(1001, "Ann", "Lee", 2026, 3, 101, 12, WHS),
                      ss.StudentRow(1002, "Bo", "Li", 2026, 0, 999999, 12, GRAD),
                      today=dt.date(2026, 7, 15)))
# An active student in a frozen OU, and one whose target OU is missing in Google.
@example(case=case_of(ss.StudentRow(1001, "Ann", "Lee", 2030, 0, 102, 7, LMS),
                      ss.StudentRow(1002, "Bo", "Li", 2030, 0, 101, 9, WHS),
                      accounts=(ss.Account("1001@d118.org", "Ann", "Lee", True, RESTRICTED, {}),
                                ss.Account("1002@d118.org", "Bo", "Li", False, LMS_7TH, {})),
                      missing_ous=[WHS_9TH]))
# Students who left: one still active in a frozen OU, one already suspended.
@example(case=case_of(ss.StudentRow(1001, "Ann", "Lee", 2030, 2, 101, 9, WHS),
                      ss.StudentRow(1002, "Bo", "Li", 2030, 1, 101, 9, WHS),
                      accounts=(ss.Account("1001@d118.org", "Ann", "Lee", False, RESTRICTED, {}),
                                ss.Account("1002@d118.org", "Bo", "Li", True, WHS_9TH, {}))))
@given(case=districts())
def test_safety_invariants(case):
    plan_ = run(case)
    directory = case.directory
    for change in plan_.changes:
        account = directory.accounts.get(change.email.lower())
        if change.action == "create":
            check_create_only_for_active_non_graduates(case, plan_, change)
        check_frozen_ou_holds(account, change)
        check_ous_exist(directory.org_units, change)
        check_suspension(account, plan_, change)


# ---------------------------------------------------------------------------
# Numbers read as text (the PowerSchool API sends every value as a string)
# ---------------------------------------------------------------------------


def _decimal_reading(text: str) -> int | None:
    """The reading of numeric text that _as_int's fast path for plain digits must agree with:
    Decimal's, for ASCII text only (another script's digits are no number to the SQL)."""
    import decimal

    if not text.isascii():
        return None
    try:
        value = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        return None
    return int(value) if value.is_finite() and value == value.to_integral_value() else None


@given(text=st.one_of(st.integers(-10**20, 10**20).map(str),
                      st.text(alphabet="0123456789-+. e\u00b2\u0661\uff11", max_size=8)))
@example(text="-")
@example(text="-0")
@example(text="0012")
@example(text="\u00b2")    # a superscript two: a digit to str.isdigit, not a number
def test_numeric_text_reads_the_same_with_or_without_the_fast_path(text):
    assert ss._as_int(text) == _decimal_reading(text)
    assert ss._as_int(text.encode()) == _decimal_reading(text)
