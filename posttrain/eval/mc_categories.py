"""Subject -> category maps of the multiple-choice benchmarks, and which one a run reports with.

Each map is category -> subjects, as the benchmark's own release groups them:
  C-Eval  hkust-nlp/ceval subject_mapping.json: 52 subjects in STEM / Social Science / Humanities / Other.
  MMLU    hendrycks/test categories.py: 57 subjects -> subcategories -> STEM / humanities /
          social sciences / other (flattened here to subjects).
  CMMLU   haonan-li/CMMLU src/categories.py: 67 subjects in STEM / Humanities / Social Science / Other,
          15 of them also in "China specific" (a subject may count in two categories).
"""

from __future__ import annotations

CEVAL_CATEGORIES = {
    "STEM": "computer_network operating_system computer_architecture college_programming college_physics "
            "college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics "
            "electrical_engineer metrology_engineer high_school_mathematics high_school_physics "
            "high_school_chemistry high_school_biology middle_school_mathematics middle_school_biology "
            "middle_school_physics middle_school_chemistry veterinary_medicine".split(),
    "Social Science": "college_economics business_administration marxism mao_zedong_thought education_science "
                      "teacher_qualification high_school_politics high_school_geography middle_school_politics "
                      "middle_school_geography".split(),
    "Humanities": "modern_chinese_history ideological_and_moral_cultivation logic law "
                  "chinese_language_and_literature art_studies professional_tour_guide legal_professional "
                  "high_school_chinese high_school_history middle_school_history".split(),
    "Other": "civil_servant sports_science plant_protection basic_medicine clinical_medicine "
             "urban_and_rural_planner accountant fire_engineer environmental_impact_assessment_engineer "
             "tax_accountant physician".split(),
}
# hendrycks/test categories.py: physics, chemistry, biology, computer science, math, engineering -> STEM;
# history, philosophy, law -> humanities; politics, culture, economics, geography, psychology -> social
# sciences; other, business, health -> other.
MMLU_CATEGORIES = {
    "STEM": "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning".split(),
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions".split(),
    "social sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy".split(),
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
             "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
             "virology".split(),
}
CMMLU_CATEGORIES = {
    "STEM": "anatomy astronomy college_actuarial_science college_engineering_hydrology college_mathematics "
            "college_medical_statistics computer_science conceptual_physics electrical_engineering "
            "elementary_mathematics genetics high_school_biology high_school_chemistry high_school_mathematics "
            "high_school_physics machine_learning virology".split(),
    "Humanities": "arts chinese_history chinese_literature college_law global_facts international_law jurisprudence "
                  "logical marxist_theory philosophy professional_law world_history world_religions".split(),
    "Social Science": "ancient_chinese business_ethics chinese_civil_service_exam chinese_food_culture "
                      "chinese_foreign_policy chinese_teacher_qualification college_education economics education "
                      "elementary_chinese ethnology high_school_geography high_school_politics journalism "
                      "management marketing modern_chinese professional_accounting professional_psychology "
                      "public_relations security_study sociology".split(),
    "Other": "agronomy chinese_driving_rule clinical_knowledge college_medicine computer_security "
             "construction_project_management elementary_commonsense elementary_information_and_technology "
             "food_science human_sexuality legal_and_moral_basis nutrition professional_medicine sports_science "
             "traditional_chinese_medicine".split(),
    "China specific": "ancient_chinese chinese_civil_service_exam chinese_driving_rule chinese_food_culture "
                      "chinese_foreign_policy chinese_history chinese_literature chinese_teacher_qualification "
                      "construction_project_management elementary_chinese elementary_commonsense ethnology "
                      "high_school_politics modern_chinese traditional_chinese_medicine".split(),
}
BUILT_IN = {"ceval": CEVAL_CATEGORIES, "mmlu": MMLU_CATEGORIES, "cmmlu": CMMLU_CATEGORIES}


def choose_categories(setting: str, layout: str, subjects: list[str],
                      custom: dict[str, list[str]]) -> tuple[str, dict[str, list[str]]]:
    """(map name, category -> subjects) for a run.

    `custom` (eval.mc.categories) wins; then an explicit `setting` (ceval, mmlu, cmmlu, none). With
    "auto", a C-Eval / MMLU / CMMLU file layout picks its own benchmark's map; a JSONL file or another
    CSV header gets the built-in map that holds the most of its subjects (none if no subject matches).
    """
    if custom:
        return "custom", custom
    if setting == "none":
        return "none", {}
    if setting != "auto":
        return setting, BUILT_IN[setting]
    if layout in BUILT_IN:
        return layout, BUILT_IN[layout]
    known = {name: len(set(subjects) & {s for subs in m.values() for s in subs}) for name, m in BUILT_IN.items()}
    best = max(known, key=known.get)  # the first of ceval, mmlu, cmmlu on a tie
    return (best, BUILT_IN[best]) if known[best] else ("none", {})
