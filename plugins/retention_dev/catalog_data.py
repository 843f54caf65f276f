"""Static description of the generated shop: category tree, brands, places, search words.

Kept apart from `generate.py` so the behaviour code reads without a page of literals.
Values never contain a comma, a double quote or a newline: the generator writes CSV
without quoting (see `generate._check_plain`).
"""

from __future__ import annotations

#: `top.mid primary_price/accessory_price: leaf, leaf*, ...` -- prices are median UAH,
#: `*` marks a main product (a phone), the other leaves are its accessories (a case).
CATEGORY_TREE = """
electronics.smartphone 12000/350: android*, iphone*, case, screen_protector, charger, cable, power_bank, holder
electronics.audio 2500/300: headphone*, earbuds*, speaker*, soundbar*, ear_tips, audio_cable
electronics.video 18000/600: tv*, projector*, tv_mount, remote, hdmi_cable, streaming_box
electronics.tablet 11000/450: android_tablet*, ipad*, tablet_case, stylus, keyboard_cover
electronics.wearables 5000/300: smartwatch*, fitness_band*, watch_strap, watch_charger, screen_film
electronics.gaming 16000/900: console*, vr_headset*, gamepad, game_disc, charging_station, gaming_headset
electronics.camera 20000/700: mirrorless*, action_camera*, lens*, memory_card, tripod, camera_bag
computers.notebook 28000/700: laptop*, ultrabook*, gaming_laptop*, laptop_bag, cooling_pad, laptop_charger, docking_station
computers.peripherals 3500/400: monitor*, printer*, keyboard, mouse, webcam, mouse_pad, printer_ink
computers.components 4000/500: videocard*, cpu*, motherboard*, ram, ssd, hdd, psu, case_fan
computers.desktop 25000/900: pc*, all_in_one*, mini_pc*, ups, speakers_2_0
computers.network 1800/250: router*, mesh_system*, switch, wifi_adapter, patch_cord
computers.office 600/120: shredder*, laminator*, label_printer*, paper, toner
appliances.kitchen 6000/400: refrigerator*, washer*, dishwasher*, microwave*, blender*, coffee_machine*, kettle*, multicooker*, coffee_capsules, water_filter, descaler
appliances.environment 5000/350: vacuum*, robot_vacuum*, air_purifier*, air_conditioner*, heater*, humidifier*, vacuum_bags, hepa_filter
appliances.personal_care 1800/250: hair_dryer*, shaver*, trimmer*, epilator*, toothbrush*, brush_heads, shaver_blades
appliances.laundry 3000/250: iron*, steamer*, ironing_board, laundry_basket
appliances.small 1500/200: toaster*, grill*, juicer*, sandwich_maker*, kitchen_scale
furniture.living_room 12000/800: sofa*, armchair*, coffee_table*, tv_stand*, cushion, throw, shelf
furniture.bedroom 14000/700: bed*, mattress*, wardrobe*, nightstand*, pillow, bedding_set, mattress_topper
furniture.kitchen 6000/400: dining_table*, chair*, bar_stool*, tablecloth, seat_pad
furniture.office 5000/500: office_chair*, desk*, monitor_arm, footrest, desk_lamp
furniture.kids 7000/400: kids_bed*, kids_desk*, toy_storage, kids_rug
furniture.garden 5000/400: garden_chair*, garden_table*, hammock*, parasol, seat_cover
home.kitchenware 900/150: cookware_set*, frying_pan*, knife_set*, food_container, cutting_board, kitchen_towel
home.textile 800/150: curtains*, rug*, blanket*, towel, bath_mat
home.lighting 900/120: ceiling_lamp*, floor_lamp*, table_lamp*, led_bulb, led_strip
home.tableware 600/120: dinner_set*, glasses*, mugs, cutlery, napkins
home.decor 500/120: vase*, wall_clock*, picture_frame, candle, artificial_plant
home.cleaning 300/80: detergent*, dish_soap*, mop*, sponges, trash_bags, microfiber_cloth
apparel.shoes 2200/250: sneakers*, boots*, sandals*, loafers*, insoles, shoe_care, socks
apparel.women 1200/250: dress*, blouse*, jeans*, coat*, skirt*, scarf, belt, tights
apparel.men 1300/250: shirt*, jeans*, jacket*, suit*, tshirt*, tie, belt, socks
apparel.kids 700/150: kids_jacket*, kids_shoes*, kids_tshirt*, kids_pajamas*, kids_hat, kids_socks
apparel.bags 1600/250: backpack*, handbag*, suitcase*, wallet, travel_organizer, luggage_tag
apparel.accessories 800/200: sunglasses*, watch*, jewelry*, umbrella, gloves, hat
beauty.skincare 450/200: moisturizer*, serum*, cleanser*, sunscreen*, sheet_mask, toner_pads
beauty.makeup 400/150: foundation*, mascara*, lipstick*, eyeshadow_palette*, makeup_brush, makeup_remover
beauty.hair 350/120: shampoo*, conditioner*, hair_mask*, styling_spray, hair_clips
beauty.fragrance 2500/300: perfume_women*, perfume_men*, body_mist, fragrance_sample
beauty.nails 250/90: nail_polish*, gel_lamp*, nail_file, base_coat, cuticle_oil
kids.toys 700/150: lego*, doll*, rc_car*, board_game*, puzzle*, batteries, toy_figure
kids.baby 800/150: diapers*, baby_formula*, baby_bottle, pacifier, wet_wipes, baby_cream
kids.carriage 12000/500: stroller*, car_seat*, stroller_bag, rain_cover, cup_holder
kids.feeding 1500/150: high_chair*, bottle_warmer*, sterilizer*, bibs, baby_spoons
kids.school 400/80: school_backpack*, art_set*, notebooks, pens, pencil_case
sport.fitness 1500/200: dumbbells*, yoga_mat*, treadmill*, exercise_bike*, resistance_band, jump_rope, shaker
sport.bicycle 14000/500: city_bike*, mountain_bike*, ebike*, bike_helmet, bike_lock, bike_light, inner_tube
sport.outdoor 2500/250: tent*, sleeping_bag*, hiking_backpack*, trekking_poles, headlamp, thermos, gas_cartridge
sport.water 1200/200: swimsuit*, paddle_board*, goggles, swim_cap, dry_bag
sport.team 900/150: football*, basketball*, volleyball*, shin_guards, ball_pump
sport.winter 8000/500: skis*, snowboard*, ski_boots*, ski_goggles, ski_gloves, thermal_underwear
auto.accessories 2500/250: dash_cam*, car_player*, car_alarm*, phone_holder, car_charger, seat_covers, floor_mats
auto.tires 3500/300: summer_tires*, winter_tires*, all_season_tires*, valve_caps, tire_inflator
auto.care 300/120: motor_oil*, car_shampoo*, wax*, wiper_blades, air_freshener, microfiber_towel
auto.tools 1500/200: jump_starter*, car_jack*, tow_rope, first_aid_kit, warning_triangle
construction.tools 2500/250: drill*, screwdriver*, angle_grinder*, saw*, welding_machine*, drill_bits, saw_blades, battery_pack
construction.garden 3000/250: lawn_mower*, grass_trimmer*, chainsaw*, garden_hose, seeds, fertilizer, pruner
construction.plumbing 2000/200: faucet*, shower_system*, water_heater*, toilet*, hose_connector, sealant_tape
construction.electrical 600/80: generator*, extension_cord*, socket, light_switch, cable_roll, circuit_breaker
construction.paint 500/120: wall_paint*, primer*, roller, paint_brush, masking_tape
pets.dogs 900/150: dog_food*, dog_bed*, leash, dog_toy, dog_treats, flea_collar
pets.cats 700/120: cat_food*, cat_litter*, scratching_post*, cat_toy, cat_treats, litter_box
pets.aquarium 1500/150: aquarium*, aquarium_filter*, fish_food, water_conditioner, aquarium_decor
pets.small_pets 800/100: cage*, hamster_food*, pet_bedding, chew_toy
grocery.coffee 450/90: coffee_beans*, ground_coffee*, capsules*, coffee_filter, syrup
grocery.tea 200/60: black_tea*, green_tea*, herbal_tea*, teapot, tea_infuser
grocery.snacks 120/40: chocolate*, cookies*, nuts*, chips, energy_bar
grocery.healthy 400/80: protein_powder*, vitamins*, granola*, superfood, shaker_bottle
books.fiction 350/80: novel*, fantasy*, detective*, bookmark, book_cover
books.nonfiction 450/80: business*, psychology*, history*, cookbook*, planner
books.kids_books 250/60: picture_book*, fairy_tales*, encyclopedia*, coloring_book, stickers
books.education 400/80: textbook*, language_course*, exam_prep*, flashcards, highlighter
"""

#: cross-category moves: after buying in the left mid-category people go on to these
RELATED = """
electronics.smartphone: electronics.audio, electronics.wearables, auto.accessories
electronics.audio: electronics.smartphone, electronics.video
electronics.video: electronics.audio, electronics.gaming, furniture.living_room
electronics.tablet: electronics.audio, computers.peripherals, books.education
electronics.wearables: electronics.smartphone, sport.fitness
electronics.gaming: electronics.video, computers.peripherals, furniture.office
electronics.camera: computers.components, apparel.bags, sport.outdoor
computers.notebook: computers.peripherals, computers.network, apparel.bags, furniture.office
computers.peripherals: computers.notebook, computers.office, furniture.office
computers.components: computers.desktop, computers.peripherals
computers.desktop: computers.peripherals, computers.components, furniture.office
computers.network: computers.notebook, computers.desktop
appliances.kitchen: home.kitchenware, grocery.coffee, appliances.small
appliances.environment: home.cleaning, appliances.laundry
appliances.personal_care: beauty.hair, beauty.skincare
appliances.small: appliances.kitchen, home.kitchenware
furniture.living_room: home.textile, home.decor, home.lighting
furniture.bedroom: home.textile, home.lighting, furniture.kids
furniture.kids: kids.toys, kids.school, home.textile
furniture.garden: construction.garden, sport.outdoor
furniture.office: computers.peripherals, home.lighting
home.kitchenware: home.tableware, appliances.small
apparel.shoes: apparel.accessories, sport.fitness
apparel.women: apparel.shoes, apparel.accessories, beauty.makeup
apparel.men: apparel.shoes, apparel.accessories, beauty.fragrance
apparel.kids: kids.toys, kids.school, apparel.shoes
beauty.skincare: beauty.makeup, beauty.hair
beauty.makeup: beauty.skincare, beauty.nails
kids.baby: kids.feeding, kids.carriage, kids.toys, apparel.kids
kids.carriage: kids.baby, auto.accessories
kids.toys: books.kids_books, apparel.kids
sport.fitness: grocery.healthy, apparel.shoes, electronics.wearables
sport.bicycle: sport.outdoor, sport.fitness
sport.outdoor: sport.water, apparel.shoes
auto.tires: auto.care, auto.tools
auto.accessories: electronics.smartphone, auto.care
construction.tools: construction.electrical, construction.paint
construction.garden: furniture.garden, construction.tools
pets.dogs: pets.cats
pets.cats: pets.dogs
grocery.coffee: appliances.kitchen, grocery.snacks, grocery.tea
books.kids_books: kids.toys, kids.school
"""

#: share of catalogue traffic per top category
TOP_WEIGHTS = {
    "electronics": 18, "computers": 10, "appliances": 12, "furniture": 5, "home": 9,
    "apparel": 12, "beauty": 8, "kids": 7, "sport": 5, "auto": 4, "construction": 4,
    "pets": 3, "grocery": 2, "books": 2,
}

#: relative order rate of customers whose home category is in this top category
#: (consumables come back sooner than sofas); normalised to mean 1 by the generator
TOP_RATE = {
    "electronics": 0.9, "computers": 0.8, "appliances": 0.7, "furniture": 0.6, "home": 1.0,
    "apparel": 1.1, "beauty": 1.5, "kids": 1.4, "sport": 0.9, "auto": 0.8,
    "construction": 0.8, "pets": 1.8, "grocery": 1.9, "books": 1.2,
}

BRANDS = {
    "electronics": "Samsung Apple Xiaomi Sony JBL Huawei Motorola Nokia Realme Anker Baseus Ugreen Garmin Canon GoPro LG Philips",
    "computers": "Lenovo HP Asus Acer Dell Apple MSI Logitech Kingston Samsung TP-Link Gigabyte Epson Canon Razer",
    "appliances": "Bosch Samsung LG Philips Tefal Electrolux Gorenje Xiaomi Braun Rowenta De'Longhi Dyson Beko Whirlpool Zelmer",
    "furniture": "Sokme Embawood Come-for Matroluxe Mebel-Service Signal Halmar Nowy-Styl Jysk-Basic Homla",
    "home": "Tefal Luminarc Ardesto Bergner Gipfel Fissman Wilmax Vileda Eglo Ikea-Line",
    "apparel": "Nike Adidas Puma New-Balance Reebok Zara Levi's Tommy-Hilfiger Columbia Skechers Mango Sinsay",
    "beauty": "L'Oreal Maybelline Nivea La-Roche-Posay Garnier Vichy Bioderma Dior Chanel NYX Essie Schwarzkopf Pantene",
    "kids": "Lego Hasbro Mattel Pampers Huggies Chicco Cybex Britax Nutricia Avent Bambi Kite",
    "sport": "Kettler Cannondale Trek Merida Salomon Head Atomic Coleman Tramp Speedo Molten Wilson",
    "auto": "Michelin Continental Bridgestone Nokian Castrol Shell Bosch 70mai Pioneer StarLine Turtle-Wax",
    "construction": "Bosch Makita DeWalt Metabo Stihl Husqvarna Dnipro-M Grohe Hansgrohe Ariston Schneider Sniezka",
    "pets": "Royal-Canin Purina Pedigree Whiskas Brit Trixie Ferplast Tetra Josera",
    "grocery": "Lavazza Jacobs Nescafe Illy Lipton Greenfield Ahmad Roshen Milka Lay's Optimum-Nutrition",
    "books": "Vivat Ranok Nash-Format KSD A-ba-ba-ha-la-ma-ha Old-Lion Laboratory Yakaboo",
}

#: leaves whose makers are a few brands, not the whole top category's list
LEAF_BRANDS = {
    "iphone": "Apple", "ipad": "Apple", "lego": "Lego",
    "android": "Samsung Xiaomi Motorola Realme Huawei Nokia",
    "android_tablet": "Samsung Xiaomi Lenovo Huawei",
    "smartwatch": "Apple Samsung Garmin Huawei Xiaomi",
    "tv": "Samsung LG Sony Philips Xiaomi", "console": "Sony Microsoft Nintendo",
    "mirrorless": "Canon Sony Nikon Fujifilm", "action_camera": "GoPro DJI Sony",
    "laptop": "Lenovo HP Asus Acer Dell Apple", "ultrabook": "Apple Asus Lenovo Dell HP",
    "gaming_laptop": "MSI Asus Lenovo Acer", "videocard": "Gigabyte MSI Asus Palit",
    "cpu": "Intel AMD", "robot_vacuum": "Xiaomi Roborock iRobot Dreame",
    "diapers": "Pampers Huggies Libero", "baby_formula": "Nutricia Nestle Humana",
    "summer_tires": "Michelin Continental Bridgestone Nokian Hankook",
    "winter_tires": "Michelin Continental Bridgestone Nokian Hankook",
    "all_season_tires": "Michelin Continental Bridgestone Hankook",
    "motor_oil": "Castrol Shell Mobil Liqui-Moly", "dog_food": "Royal-Canin Purina Pedigree Brit Josera",
    "cat_food": "Royal-Canin Purina Whiskas Brit Josera",
}

#: display names where `leaf.replace("_", " ").capitalize()` reads wrong
LEAF_TITLE = {
    "android": "Smartphone", "iphone": "iPhone", "ipad": "iPad", "tv": "TV", "pc": "PC",
    "android_tablet": "Tablet", "ups": "UPS", "ssd": "SSD", "hdd": "HDD", "cpu": "CPU",
    "ram": "RAM", "psu": "PSU", "vr_headset": "VR headset", "hdmi_cable": "HDMI cable",
    "led_bulb": "LED bulb", "led_strip": "LED strip", "rc_car": "RC car",
    "speakers_2_0": "Speakers 2.0", "lego": "Constructor set",
}

#: search words people type (Ukrainian and Russian mixed in, as in a Ukrainian shop)
LEAF_QUERIES = {
    "android": "смартфон|samsung galaxy|xiaomi redmi|телефон", "iphone": "iphone 15|айфон|iphone",
    "case": "чохол|чехол iphone|case", "screen_protector": "захисне скло|скло на телефон",
    "charger": "зарядка|зарядний пристрій|charger type-c", "power_bank": "повербанк|powerbank",
    "headphone": "навушники|наушники sony", "earbuds": "airpods|бездротові навушники",
    "tv": "телевізор|smart tv|телевизор 55", "laptop": "ноутбук|ноутбук lenovo|macbook",
    "refrigerator": "холодильник|холодильник bosch", "washer": "пральна машина|стиральная машина",
    "vacuum": "пилосос|пылесос", "robot_vacuum": "робот пилосос|roborock",
    "sneakers": "кросівки|кроссовки nike|sneakers", "dress": "сукня|платье",
    "coffee_beans": "кава в зернах|кофе|lavazza", "capsules": "капсули|nespresso",
    "cat_food": "корм для котів|корм royal canin", "dog_food": "корм для собак",
    "diapers": "підгузки|памперсы|pampers", "winter_tires": "зимові шини|зимняя резина",
    "drill": "дриль|шуруповерт", "mattress": "матрац|матрас", "perfume_women": "парфуми|духи",
    "generator": "генератор|генератор інверторний|зарядна станція",
    "stroller": "коляска|візочок", "lego": "лего|lego city", "smartwatch": "смарт годинник|apple watch",
}

#: (city, country, IANA time zone, weight) -- most customers are Ukrainian
LOCATIONS = [
    ("Kyiv", "UA", "Europe/Kyiv", 30.0), ("Kharkiv", "UA", "Europe/Kyiv", 8.0),
    ("Odesa", "UA", "Europe/Kyiv", 8.0), ("Dnipro", "UA", "Europe/Kyiv", 8.0),
    ("Lviv", "UA", "Europe/Kyiv", 8.0), ("Zaporizhzhia", "UA", "Europe/Kyiv", 4.0),
    ("Vinnytsia", "UA", "Europe/Kyiv", 3.0), ("Poltava", "UA", "Europe/Kyiv", 2.5),
    ("Ivano-Frankivsk", "UA", "Europe/Kyiv", 2.5), ("Chernihiv", "UA", "Europe/Kyiv", 2.0),
    ("Ternopil", "UA", "Europe/Kyiv", 2.0), ("Khmelnytskyi", "UA", "Europe/Kyiv", 2.0),
    ("Cherkasy", "UA", "Europe/Kyiv", 2.0), ("Zhytomyr", "UA", "Europe/Kyiv", 2.0),
    ("Rivne", "UA", "Europe/Kyiv", 2.0), ("Mykolaiv", "UA", "Europe/Kyiv", 2.0),
    ("Uzhhorod", "UA", "Europe/Kyiv", 1.5), ("Lutsk", "UA", "Europe/Kyiv", 1.5),
    ("Sumy", "UA", "Europe/Kyiv", 1.5), ("Kropyvnytskyi", "UA", "Europe/Kyiv", 1.2),
    ("Warsaw", "PL", "Europe/Warsaw", 3.0), ("Krakow", "PL", "Europe/Warsaw", 1.5),
    ("Wroclaw", "PL", "Europe/Warsaw", 1.2), ("Gdansk", "PL", "Europe/Warsaw", 0.8),
    ("Berlin", "DE", "Europe/Berlin", 1.2), ("Munich", "DE", "Europe/Berlin", 0.6),
    ("Prague", "CZ", "Europe/Prague", 0.8), ("Chisinau", "MD", "Europe/Chisinau", 1.0),
    ("Almaty", "KZ", "Asia/Almaty", 1.2), ("Astana", "KZ", "Asia/Almaty", 0.6),
    ("Tbilisi", "GE", "Asia/Tbilisi", 0.5), ("London", "GB", "Europe/London", 0.7),
]

#: country -> (calling code, mobile prefixes, digits after the prefix)
PHONE_PLANS = {
    "UA": ("380", ("50", "63", "66", "67", "68", "73", "93", "95", "96", "97", "98", "99"), 7),
    "PL": ("48", ("5", "6", "7", "8"), 8),
    "DE": ("49", ("151", "152", "157", "160", "170", "176"), 8),
    "CZ": ("420", ("6", "7"), 8),
    "MD": ("373", ("6", "7"), 7),
    "KZ": ("7", ("700", "701", "705", "707", "747", "771", "777"), 7),
    "GE": ("995", ("5",), 8),
    "GB": ("44", ("7",), 9),
}

#: Ukrainian mobile prefix never given to a customer: phones of shoppers the shop does not know
STRANGER_UA_PREFIX = "91"

#: UA stores per city (cities not listed have none)
STORES_PER_CITY = {
    "Kyiv": 9, "Kharkiv": 3, "Odesa": 3, "Dnipro": 3, "Lviv": 3, "Zaporizhzhia": 2,
    "Vinnytsia": 1, "Poltava": 1, "Ivano-Frankivsk": 1, "Chernihiv": 1, "Ternopil": 1,
    "Khmelnytskyi": 1, "Cherkasy": 1, "Zhytomyr": 1, "Rivne": 1, "Mykolaiv": 1,
}

FIRST_NAMES = (
    "olena iryna oksana nataliia tetiana yuliia anna mariia kateryna viktoriia svitlana "
    "andrii oleksandr serhii dmytro mykola volodymyr ivan oleh yurii maksym artem taras "
    "bohdan vitalii roman pavlo denys anastasiia sofiia daryna"
).split()
LAST_NAMES = (
    "shevchenko kovalenko bondarenko tkachenko kravchenko boyko kovalchuk oliinyk "
    "shevchuk polishchuk lysenko marchenko melnyk savchenko rudenko moroz petrenko "
    "kuzmenko ponomarenko kozak hrytsenko pavlenko levchenko nowak kowalski muller"
).split()

#: generated addresses never reach a real inbox (RFC 2606 domains)
EMAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example.com")

PAYMENT_METHODS = (("cash_on_delivery", 0.38), ("card", 0.42), ("apple_pay", 0.08),
                   ("google_pay", 0.08), ("installments", 0.04))
CANCEL_REASONS = (("customer_request", 0.5), ("payment_failed", 0.25), ("not_picked_up", 0.25))
