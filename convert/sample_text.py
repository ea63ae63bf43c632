"""A small fixed multilingual text sample for the conversion quality report.

Written for this project (no third-party text): one short passage per language
Granite 4.0 lists, plus code, a chat turn and numbers. Kept as a Python module
so it ships with the package without package-data settings. Change it and every
earlier quality number stops being comparable: don't, or bump SAMPLE_VERSION.
"""

SAMPLE_VERSION = 1

PASSAGES: list[str] = [
    # English
    (
        "The library opens at nine in the morning and closes at six in the evening. On "
        "Saturdays the reading room stays open until noon, and children's books can be "
        "borrowed for three weeks instead of two."
    ),
    # German
    (
        "Der Zug nach Hamburg hat heute zwanzig Minuten Verspätung, weil eine Weiche in "
        "der Nähe von Hannover repariert werden muss. Reisende können ihre Fahrkarten "
        "kostenlos umtauschen."
    ),
    # Spanish
    (
        "Para preparar una buena tortilla de patatas, corta las patatas en láminas finas, "
        "fríelas a fuego lento con la cebolla y mézclalas con los huevos batidos antes de "
        "cuajarla en la sartén."
    ),
    # French
    (
        "Le musée présente cette année une exposition consacrée aux cartes anciennes : on y "
        "voit comment les navigateurs imaginaient les côtes lointaines avant l'invention du "
        "télégraphe."
    ),
    # Japanese
    (
        "明日の会議は午前十時から第三会議室で行います。資料は前日までに共有フォルダに保存して"
        "ください。質問があれば遠慮なく連絡してください。"
    ),
    # Portuguese
    (
        "A cooperativa de agricultores decidiu plantar mais árvores ao longo do rio para "
        "proteger o solo da erosão e oferecer sombra ao gado durante o verão."
    ),
    # Arabic
    (
        "يبدأ العام الدراسي الجديد في شهر سبتمبر، ويجب على الطلاب تسجيل المواد قبل نهاية "
        "الأسبوع الأول من الدراسة."
    ),
    # Czech
    (
        "Na horách dnes v noci napadlo dvacet centimetrů sněhu, takže lanovky budou od rána "
        "v provozu a silnice do údolí se musí protahovat."
    ),
    # Italian
    (
        "Il negozio all'angolo vende pane fresco ogni mattina; il sabato prepara anche "
        "focacce con rosmarino e olive che finiscono quasi sempre prima di mezzogiorno."
    ),
    # Korean
    (
        "이번 주말에는 비가 많이 올 예정이니 우산을 꼭 챙기세요. 등산 계획은 다음 주로 미루는 것이 "
        "좋겠습니다."
    ),
    # Dutch
    (
        "De fietsenmaker in onze straat repareert niet alleen banden, maar bouwt ook oude "
        "racefietsen op tot ze weer als nieuw rijden."
    ),
    # Chinese
    "这座城市的公共交通非常方便，地铁每隔三分钟就有一班，晚上十一点以后还有夜间公交车。",
    # Code
    (
        "def moving_average(values, window):\n"
        "    if window <= 0:\n"
        '        raise ValueError("window must be positive")\n'
        "    total = sum(values[:window])\n"
        "    result = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        result.append(total / window)\n"
        "    return result\n"
    ),
    # A chat turn in Granite's format, and numbers
    (
        "<|start_of_role|>user<|end_of_role|>What is 17 multiplied by 23?<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>17 multiplied by 23 is 391.<|end_of_text|>\n"
    ),
]
